//! The three providers' token protocols, as Azure's own SDKs speak them:
//!
//! - IMDS: `GET {host}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=..[&client_id=..]`
//!   with `Metadata: true` (the header proves the request did not come through a proxy).
//! - App Service: `GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=..[&client_id=..]` with
//!   `X-IDENTITY-HEADER: $IDENTITY_HEADER` (a per-process secret the platform rotates with the process).
//! - Workload identity: `POST {authority}{tenant}/oauth2/v2.0/token` with a client-credentials form
//!   whose `client_assertion` is the federated token file's content, read afresh for every exchange
//!   because the kubelet rotates the file.
//!
//! Where the endpoints are comes from the environment (as the platforms set it) unless `endpoint`
//! in the config says otherwise, which is also how the tests point them at local servers.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, header};
use reqwest::Url;

use super::{AccessToken, IdentityError, Secret, TokenSource, error_description, parse_token};
use crate::config::{EnvLookup, IdentityProvider, ManagedIdentityConfig};

const DEFAULT_IMDS_HOST: &str = "http://169.254.169.254";
const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
const IMDS_API_VERSION: &str = "2018-02-01";
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Bounds one token request; a request waiting for its backend's first token waits this long at most.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A token endpoint resolved from config and the environment at start-up.
#[derive(Debug, Clone)]
pub enum TokenEndpoint {
    /// IMDS and App Service: a GET of `url` (query included) with a header proving where it came from.
    Get { provider: IdentityProvider, url: Url, proof: (HeaderName, HeaderValue) },
    /// Workload identity: the federated token exchanged for an access token.
    Exchange { url: Url, client_id: String, scope: String, token_file: PathBuf },
}

/// A config field (relative to `auth`) and what is wrong with it.
pub type FieldError = (&'static str, String);

impl TokenEndpoint {
    /// Resolves the config against the environment; errors name the field they belong to. Config
    /// validation runs this, so a missing variable stops the gateway at start-up.
    pub fn resolve(config: &ManagedIdentityConfig, env: EnvLookup<'_>) -> Result<Self, FieldError> {
        let resource = config.resource.trim();
        if resource.is_empty() || resource.contains(char::is_whitespace) {
            return Err((
                "resource",
                format!("must be a resource URI or app id without spaces: {:?}", config.resource),
            ));
        }
        if let Some(id) = &config.client_id
            && (id.is_empty() || id.contains(char::is_whitespace))
        {
            return Err(("client-id", format!("must be a client id without spaces: {id:?}")));
        }
        let provider = config.provider;
        if provider != IdentityProvider::WorkloadIdentity {
            if config.tenant_id.is_some() {
                return Err(("tenant-id", "only the workload-identity provider takes a tenant".to_owned()));
            }
            if config.token_file.is_some() {
                return Err(("token-file", "only the workload-identity provider reads a token file".to_owned()));
            }
        }
        match provider {
            IdentityProvider::Imds => {
                // Like the SDKs: AAD Pod Identity's NMI and Azure Arc put IMDS elsewhere.
                let host = configured_url(config, env, &["AZURE_POD_IDENTITY_AUTHORITY_HOST", "IMDS_ENDPOINT"])?
                    .unwrap_or_else(|| DEFAULT_IMDS_HOST.to_owned());
                let url = parse_url(&format!("{}{IMDS_PATH}", host.trim_end_matches('/')), "endpoint")?;
                Ok(Self::Get {
                    provider,
                    url: with_query(url, IMDS_API_VERSION, resource, config.client_id.as_deref()),
                    proof: (HeaderName::from_static("metadata"), HeaderValue::from_static("true")),
                })
            }
            IdentityProvider::AppService => {
                let endpoint = configured_url(config, env, &["IDENTITY_ENDPOINT"])?.ok_or_else(|| {
                    missing_env(
                        "IDENTITY_ENDPOINT",
                        "App Service sets it when the app has a managed identity; or set auth.endpoint",
                    )
                })?;
                let url = parse_url(&endpoint, "endpoint")?;
                let secret = env("IDENTITY_HEADER").filter(|v| !v.is_empty()).ok_or_else(|| {
                    missing_env("IDENTITY_HEADER", "App Service sets it when the app has a managed identity")
                })?;
                let mut proof = HeaderValue::try_from(secret).map_err(|_| {
                    ("provider", "the value of IDENTITY_HEADER is not valid in an HTTP header".to_owned())
                })?;
                proof.set_sensitive(true);
                Ok(Self::Get {
                    provider,
                    url: with_query(url, APP_SERVICE_API_VERSION, resource, config.client_id.as_deref()),
                    proof: (HeaderName::from_static("x-identity-header"), proof),
                })
            }
            IdentityProvider::WorkloadIdentity => {
                let authority = configured_url(config, env, &["AZURE_AUTHORITY_HOST"])?
                    .unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
                let tenant = setting(config.tenant_id.as_deref(), env, "AZURE_TENANT_ID", "tenant-id")?;
                let valid_tenant = tenant.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
                if !valid_tenant {
                    return Err(("tenant-id", format!("not a tenant id or domain: {tenant:?}")));
                }
                let client_id = setting(config.client_id.as_deref(), env, "AZURE_CLIENT_ID", "client-id")?;
                let token_file = match &config.token_file {
                    Some(path) => path.clone(),
                    None => PathBuf::from(setting(None, env, "AZURE_FEDERATED_TOKEN_FILE", "token-file")?),
                };
                // The SDKs accept the authority host with or without its trailing slash.
                let url = format!("{}/{tenant}/oauth2/v2.0/token", authority.trim_end_matches('/'));
                Ok(Self::Exchange {
                    url: parse_url(&url, "endpoint")?,
                    client_id,
                    scope: format!("{resource}/.default"),
                    token_file,
                })
            }
        }
    }

    /// Identifies the identity: backends with equal keys share one token cache.
    pub fn cache_key(&self) -> String {
        match self {
            Self::Get { provider, url, .. } => format!("{provider:?} {url}"),
            Self::Exchange { url, client_id, scope, token_file } => {
                format!("WorkloadIdentity {url} {client_id} {scope} {}", token_file.display())
            }
        }
    }

    pub fn into_source(self) -> Result<HttpTokenSource, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(TOKEN_REQUEST_TIMEOUT)
            // A redirect would carry the identity header or the assertion elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client for token requests: {e}"))?;
        Ok(HttpTokenSource { endpoint: self, client })
    }
}

/// The endpoint from the config, else from the first of `vars` that is set; checked to be a URL.
fn configured_url(
    config: &ManagedIdentityConfig,
    env: EnvLookup<'_>,
    vars: &[&str],
) -> Result<Option<String>, FieldError> {
    if let Some(endpoint) = &config.endpoint {
        parse_url(endpoint, "endpoint")?;
        return Ok(Some(endpoint.clone()));
    }
    for var in vars {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            parse_url(&value, "provider").map_err(|(field, _)| {
                (field, format!("environment variable {var} is not an http(s) URL: {value:?}"))
            })?;
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn parse_url(text: &str, field: &'static str) -> Result<Url, FieldError> {
    match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        _ => Err((field, format!("must be an http(s) URL with a host: {text:?}"))),
    }
}

/// A value from the config, else from the environment.
fn setting(configured: Option<&str>, env: EnvLookup<'_>, var: &str, field: &'static str) -> Result<String, FieldError> {
    match configured {
        Some("") => Err((field, "must not be empty".to_owned())),
        Some(value) => Ok(value.to_owned()),
        None => env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
            (field, format!("environment variable {var} is not set (AKS sets it for pods that use workload identity); or set auth.{field}"))
        }),
    }
}

fn missing_env(var: &str, hint: &str) -> FieldError {
    ("provider", format!("environment variable {var} is not set ({hint})"))
}

fn with_query(mut url: Url, api_version: &str, resource: &str, client_id: Option<&str>) -> Url {
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("api-version", api_version).append_pair("resource", resource);
        if let Some(id) = client_id {
            query.append_pair("client_id", id);
        }
    }
    url
}

/// Fetches tokens over HTTP from a resolved endpoint.
pub struct HttpTokenSource {
    endpoint: TokenEndpoint,
    client: reqwest::Client,
}

#[async_trait]
impl TokenSource for HttpTokenSource {
    fn provider(&self) -> IdentityProvider {
        match &self.endpoint {
            TokenEndpoint::Get { provider, .. } => *provider,
            TokenEndpoint::Exchange { .. } => IdentityProvider::WorkloadIdentity,
        }
    }

    async fn fetch(&self) -> Result<AccessToken, IdentityError> {
        let provider = self.provider();
        // What the endpoint must not see echoed back into an error we pass on.
        let (request, secret, url) = match &self.endpoint {
            TokenEndpoint::Get { url, proof: (name, value), .. } => {
                let secret =
                    (provider == IdentityProvider::AppService).then(|| Secret::new(value.to_str().unwrap_or_default()));
                (self.client.get(url.clone()).header(name.clone(), value.clone()), secret, url)
            }
            TokenEndpoint::Exchange { url, client_id, scope, token_file } => {
                let assertion = read_assertion(token_file).await?;
                let form = [
                    ("client_id", client_id.as_str()),
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                    ("client_assertion", assertion.expose()),
                    ("scope", scope.as_str()),
                ];
                let body = form
                    .iter()
                    .map(|(name, value)| format!("{name}={}", backend_url::encode_segment(value)))
                    .collect::<Vec<_>>()
                    .join("&");
                let request = self
                    .client
                    .post(url.clone())
                    .header(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"))
                    .body(body);
                (request, Some(assertion), url)
            }
        };
        let unreachable = |error: reqwest::Error| {
            tracing::warn!(provider = ?provider, url = %url, error = %error, source = ?std::error::Error::source(&error), "token request failed");
            let detail = if error.is_timeout() {
                "did not answer in time"
            } else if error.is_connect() {
                "could not be reached"
            } else {
                "broke the connection off"
            };
            IdentityError::Unreachable { provider, detail }
        };
        let response = request.header(header::ACCEPT, "application/json").send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let mut description = error_description(&body);
            if let Some(secret) = secret.as_ref().filter(|s| !s.expose().is_empty()) {
                description = description.replace(secret.expose(), "[redacted]");
            }
            return Err(IdentityError::Refused { provider, status: status.as_u16(), description });
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        parse_token(&body, now).map_err(|detail| IdentityError::BadAnswer { provider, detail })
    }
}

/// The federated token, read afresh: the kubelet rewrites the file before the token expires.
async fn read_assertion(path: &std::path::Path) -> Result<Secret, IdentityError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        tracing::error!(path = %path.display(), error = %e, "cannot read the federated token file");
        IdentityError::TokenFile { detail: e.kind().to_string() }
    })?;
    let assertion = text.trim();
    if assertion.is_empty() {
        tracing::error!(path = %path.display(), "the federated token file is empty");
        return Err(IdentityError::TokenFile { detail: "it is empty".to_owned() });
    }
    Ok(Secret::new(assertion))
}
