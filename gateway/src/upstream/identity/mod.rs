//! Managed identity: bearer tokens for backends, from the identity of wherever the gateway runs, so
//! no key has to be deployed (API Management's authentication-managed-identity).
//!
//! Three token providers speak the platforms' own protocols ([`endpoint`]): Azure IMDS, the App
//! Service identity endpoint, and AKS workload identity (a federated token exchanged at Microsoft
//! Entra ID). Each distinct identity has one [`TokenCache`], shared by every backend that uses it,
//! which refreshes the token before it expires with a single request while the others keep using
//! the still-valid one.
//!
//! Tokens and federated assertions are [`Secret`]s: never printed, logged or put into an error.

mod cache;
mod endpoint;
mod response;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use cache::TokenCache;
pub use endpoint::TokenEndpoint;
pub use response::{error_description, parse_token};

use crate::config::{EnvLookup, IdentityProvider, ManagedIdentityConfig};

/// A token or an assertion: its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A token as a provider hands it out. The lifetime is relative to when it was received, so a
/// skewed wall clock only matters for endpoints that send nothing but an absolute `expires_on`.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub secret: Secret,
    pub expires_in: Duration,
}

/// Gets a fresh token from a provider; caching is [`TokenCache`]'s job.
#[async_trait]
pub trait TokenSource: Send + Sync {
    fn provider(&self) -> IdentityProvider;
    async fn fetch(&self) -> Result<AccessToken, IdentityError>;
}

/// Why no token could be had. Never holds a token, an assertion or the identity header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// The token endpoint could not be reached or did not answer in time.
    Unreachable { provider: IdentityProvider, detail: &'static str },
    /// The token endpoint answered with an error status; `description` is its own explanation.
    Refused { provider: IdentityProvider, status: u16, description: String },
    /// The token endpoint answered 2xx with something that is not a usable token.
    BadAnswer { provider: IdentityProvider, detail: String },
    /// The federated token file of workload identity cannot be read (a deployment problem of the
    /// gateway's own, not of the endpoint).
    TokenFile { detail: String },
    /// The fetch ended without an answer (the runtime is shutting down).
    Interrupted,
}

impl IdentityError {
    /// Whether the cause lies in the gateway's own setup rather than at the token endpoint.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::TokenFile { .. } | Self::Interrupted)
    }
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { provider, detail } => write!(f, "{} {detail}", provider_name(*provider)),
            Self::Refused { provider, status, description } if description.is_empty() => {
                write!(f, "{} answered {status}", provider_name(*provider))
            }
            Self::Refused { provider, status, description } => {
                write!(f, "{} answered {status}: {description}", provider_name(*provider))
            }
            Self::BadAnswer { provider, detail } => {
                write!(f, "{} sent an unusable answer: {detail}", provider_name(*provider))
            }
            Self::TokenFile { detail } => write!(f, "the federated token file cannot be read: {detail}"),
            Self::Interrupted => f.write_str("the token request was interrupted"),
        }
    }
}

impl std::error::Error for IdentityError {}

/// How errors and logs name a provider.
pub fn provider_name(provider: IdentityProvider) -> &'static str {
    match provider {
        IdentityProvider::Imds => "the IMDS identity endpoint",
        IdentityProvider::AppService => "the App Service identity endpoint",
        IdentityProvider::WorkloadIdentity => "the Microsoft Entra token endpoint (workload identity)",
    }
}

/// The token caches of one gateway, one per distinct identity (provider, endpoint, resource, client
/// id, and for workload identity the tenant and token file), shared by the backends that use it.
#[derive(Default)]
pub struct TokenCaches {
    caches: HashMap<String, Arc<TokenCache>>,
}

impl TokenCaches {
    /// The cache for this identity, created on first use. The config is validated already, so an
    /// error here is unexpected (the HTTP client cannot be built).
    pub fn for_config(
        &mut self,
        config: &ManagedIdentityConfig,
        env: EnvLookup<'_>,
    ) -> Result<Arc<TokenCache>, String> {
        let endpoint =
            TokenEndpoint::resolve(config, env).map_err(|(field, message)| format!("auth.{field}: {message}"))?;
        let key = endpoint.cache_key();
        if let Some(cache) = self.caches.get(&key) {
            return Ok(cache.clone());
        }
        let cache = Arc::new(TokenCache::new(Box::new(endpoint.into_source()?)));
        self.caches.insert(key, cache.clone());
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Environment variables of a test.
    type Vars = &'static [(&'static str, &'static str)];

    fn document(auth: &str) -> String {
        format!(
            "[backends.sim]\nurl = \"http://127.0.0.1:9/v1\"\nkind = \"openai\"\nauth = {auth}\n\n\
             [apis.aoai]\nkind = \"openai\"\nbackend = \"sim\"\nsubscription-required = false\n"
        )
    }

    fn env_of(vars: Vars) -> impl Fn(&str) -> Option<String> {
        move |name: &str| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
    }

    fn error(auth: &str, vars: Vars) -> String {
        Config::parse(&document(auth), &env_of(vars)).expect_err("config should be rejected").to_string()
    }

    fn endpoint(auth: &str, vars: Vars) -> TokenEndpoint {
        let config = Config::parse(&document(auth), &env_of(vars)).expect("valid");
        let crate::config::BackendAuthConfig::ManagedIdentity(identity) = &config.backends["sim"].auth else {
            panic!("not a managed identity")
        };
        TokenEndpoint::resolve(identity, &env_of(vars)).expect("resolves")
    }

    fn get_url(endpoint: TokenEndpoint) -> String {
        match endpoint {
            TokenEndpoint::Get { url, .. } => url.to_string(),
            TokenEndpoint::Exchange { .. } => panic!("not a GET endpoint"),
        }
    }

    #[test]
    fn imds_defaults_and_environment_overrides() {
        let auth = r#"{ type = "managed-identity", provider = "imds" }"#;
        assert_eq!(
            get_url(endpoint(auth, &[])),
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fcognitiveservices.azure.com"
        );
        let pod_identity =
            &[("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://10.0.0.1:2579/"), ("IMDS_ENDPOINT", "http://x")];
        assert!(
            get_url(endpoint(auth, pod_identity)).starts_with("http://10.0.0.1:2579/metadata/identity/oauth2/token?")
        );
        let configured =
            r#"{ type = "managed-identity", provider = "imds", endpoint = "http://127.0.0.1:1", client-id = "c" }"#;
        assert!(get_url(endpoint(configured, pod_identity)).starts_with("http://127.0.0.1:1/metadata/"));
        assert!(get_url(endpoint(configured, pod_identity)).ends_with("&client_id=c"));
    }

    #[test]
    fn workload_identity_settings_come_from_config_or_environment() {
        let auth = r#"{ type = "managed-identity", provider = "workload-identity" }"#;
        let aks = &[
            ("AZURE_TENANT_ID", "tenant"),
            ("AZURE_CLIENT_ID", "client"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/azure/tokens/azure-identity-token"),
        ];
        let TokenEndpoint::Exchange { url, client_id, scope, token_file } = endpoint(auth, aks) else {
            panic!("not an exchange")
        };
        assert_eq!(url.as_str(), "https://login.microsoftonline.com/tenant/oauth2/v2.0/token");
        assert_eq!((client_id.as_str(), scope.as_str()), ("client", "https://cognitiveservices.azure.com/.default"));
        assert_eq!(token_file, std::path::Path::new("/var/run/secrets/azure/tokens/azure-identity-token"));
        let configured = r#"{ type = "managed-identity", provider = "workload-identity", tenant-id = "t2", client-id = "c2", token-file = "/f" }"#;
        let TokenEndpoint::Exchange { url, client_id, token_file, .. } = endpoint(configured, aks) else {
            panic!("not an exchange")
        };
        assert_eq!((url.path(), client_id.as_str()), ("/t2/oauth2/v2.0/token", "c2"));
        assert_eq!(token_file, std::path::Path::new("/f"));
    }

    #[test]
    fn config_errors_name_the_field_and_the_variable() {
        let app_service = r#"{ type = "managed-identity", provider = "app-service" }"#;
        let cases: [(&str, Vars, &str); 8] = [
            (
                app_service,
                &[("IDENTITY_HEADER", "h")],
                "backends.sim.auth.provider: environment variable IDENTITY_ENDPOINT is not set",
            ),
            (
                app_service,
                &[("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi")],
                "backends.sim.auth.provider: environment variable IDENTITY_HEADER is not set",
            ),
            (
                app_service,
                &[("IDENTITY_ENDPOINT", "not a url"), ("IDENTITY_HEADER", "h")],
                "backends.sim.auth.provider: environment variable IDENTITY_ENDPOINT is not an http(s) URL",
            ),
            (
                r#"{ type = "managed-identity", provider = "workload-identity", client-id = "c", token-file = "/f" }"#,
                &[],
                "backends.sim.auth.tenant-id: environment variable AZURE_TENANT_ID is not set",
            ),
            (
                r#"{ type = "managed-identity", provider = "workload-identity", tenant-id = "t", token-file = "/f" }"#,
                &[],
                "backends.sim.auth.client-id: environment variable AZURE_CLIENT_ID is not set",
            ),
            (
                r#"{ type = "managed-identity", provider = "imds", endpoint = "169.254.169.254" }"#,
                &[],
                "backends.sim.auth.endpoint: must be an http(s) URL",
            ),
            (
                r#"{ type = "managed-identity", provider = "imds", tenant-id = "t" }"#,
                &[],
                "backends.sim.auth.tenant-id: only the workload-identity provider",
            ),
            (
                r#"{ type = "managed-identity", provider = "imds", resource = "" }"#,
                &[],
                "backends.sim.auth.resource: must be",
            ),
        ];
        for (auth, vars, expected) in cases {
            let message = error(auth, vars);
            assert!(message.starts_with(expected), "{auth}: {message}");
        }
        let unknown = error(r#"{ type = "managed-identity", provider = "imds", clientid = "c" }"#, &[]);
        assert!(unknown.starts_with("backends.sim.auth") && unknown.contains("clientid"), "{unknown}");
        let provider = error(r#"{ type = "managed-identity", provider = "msi" }"#, &[]);
        assert!(provider.starts_with("backends.sim.auth") && provider.contains("msi"), "{provider}");
    }
}
