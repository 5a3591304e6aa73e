//! Every error a client can see, and the one place that renders them as HTTP.
//!
//! Bodies follow OpenAI's shape, `{"error":{"message","type","param","code"}}`, so the official SDKs
//! raise their own error types, and also carry API Management's `statusCode` and `message`, so
//! clients written against APIM read them too. Messages never contain secrets: a subscription key
//! or backend key is never put into an error.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// API Management's wording for the two 401s.
pub const MISSING_KEY_MESSAGE: &str = "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.";
pub const INVALID_KEY_MESSAGE: &str =
    "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    MissingSubscriptionKey,
    InvalidSubscriptionKey,
    /// An invalid key from an address that has sent too many of them (see `key_guessing`).
    TooManyInvalidKeys {
        retry_after_secs: u64,
    },
    /// The request is malformed; `param` names the offending field like OpenAI does.
    InvalidRequest {
        message: String,
        param: Option<Cow<'static, str>>,
    },
    BodyTooLarge {
        limit: usize,
    },
    NotFound {
        method: String,
        path: String,
    },
    MethodNotAllowed,
    /// The backend could not be reached or broke the exchange off.
    BackendUnavailable {
        backend: String,
        detail: String,
    },
    BackendTimeout {
        backend: String,
    },
    /// The backend answered with something the gateway cannot use: an unparsable response head,
    /// or a body or stream beyond what a well-behaved backend sends. `detail` is the gateway's own
    /// wording (never the backend's bytes).
    BackendInvalidResponse {
        backend: String,
        detail: &'static str,
    },
    /// No managed identity token for the backend; `local` when the cause is the gateway's own setup
    /// (500) rather than the token endpoint (502). `reason` never holds a token or assertion.
    BackendToken {
        backend: String,
        reason: String,
        local: bool,
    },
    /// Every backend the request could go to has its circuit breaker open.
    NoBackendAvailable {
        /// The backend or pool the API sends to.
        target: String,
        pool: bool,
        retry_after_secs: u64,
    },
    /// token-limit: the per-minute window is full.
    TokenLimitExceeded {
        retry_after_secs: u64,
    },
    /// token-limit: the period's token quota is used up.
    TokenQuotaExceeded {
        retry_after_secs: u64,
    },
    /// token-limit: the request alone needs more tokens than a window or quota allows.
    TokensOverLimit {
        needed: u64,
        max: u64,
    },
    /// rate-limit-by-key.
    RateLimitExceeded {
        retry_after_secs: u64,
    },
    /// quota-by-key.
    CallQuotaExceeded {
        retry_after_secs: u64,
    },
    /// The shared counter store is unavailable and the policy fails closed.
    LimitStoreUnavailable,
    /// `/admin/*` without an `[admin]` key configured.
    AdminApiDisabled,
    MissingAdminKey,
    InvalidAdminKey,
    /// The usage ledger could not be read (`detail` carries no secrets: error kinds only).
    LedgerUnavailable {
        detail: String,
    },
    Internal,
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest { message: message.into(), param: param.map(Cow::Borrowed) }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingSubscriptionKey
            | Self::InvalidSubscriptionKey
            | Self::MissingAdminKey
            | Self::InvalidAdminKey => StatusCode::UNAUTHORIZED,
            Self::AdminApiDisabled => StatusCode::FORBIDDEN,
            Self::LedgerUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BackendUnavailable { .. } => StatusCode::BAD_GATEWAY,
            Self::BackendTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BackendInvalidResponse { .. } => StatusCode::BAD_GATEWAY,
            Self::BackendToken { local: false, .. } => StatusCode::BAD_GATEWAY,
            Self::BackendToken { local: true, .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::TokenLimitExceeded { .. }
            | Self::TokensOverLimit { .. }
            | Self::RateLimitExceeded { .. }
            | Self::TooManyInvalidKeys { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::TokenQuotaExceeded { .. } | Self::CallQuotaExceeded { .. } => StatusCode::FORBIDDEN,
            Self::LimitStoreUnavailable | Self::NoBackendAvailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable code; also what the request log records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingSubscriptionKey => "missing_subscription_key",
            Self::InvalidSubscriptionKey => "invalid_subscription_key",
            Self::TooManyInvalidKeys { .. } => "too_many_invalid_keys",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::NotFound { .. } => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BackendUnavailable { .. } => "backend_unavailable",
            Self::BackendTimeout { .. } => "backend_timeout",
            Self::BackendInvalidResponse { .. } => "backend_invalid_response",
            Self::BackendToken { .. } => "backend_token_unavailable",
            Self::NoBackendAvailable { .. } => "no_backend_available",
            Self::TokenLimitExceeded { .. } => "token_limit_exceeded",
            Self::TokenQuotaExceeded { .. } => "token_quota_exceeded",
            Self::TokensOverLimit { .. } => "tokens_over_limit",
            Self::RateLimitExceeded { .. } => "rate_limit_exceeded",
            Self::CallQuotaExceeded { .. } => "call_quota_exceeded",
            Self::LimitStoreUnavailable => "limit_store_unavailable",
            Self::AdminApiDisabled => "admin_api_disabled",
            Self::MissingAdminKey => "missing_admin_key",
            Self::InvalidAdminKey => "invalid_admin_key",
            Self::LedgerUnavailable { .. } => "ledger_unavailable",
            Self::Internal => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            403 => "permission_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::MissingSubscriptionKey => MISSING_KEY_MESSAGE.to_owned(),
            Self::InvalidSubscriptionKey => INVALID_KEY_MESSAGE.to_owned(),
            Self::TooManyInvalidKeys { retry_after_secs } => format!(
                "Too many requests with an invalid subscription key from this address. Try again in \
                 {retry_after_secs} seconds."
            ),
            Self::InvalidRequest { message, .. } => message.clone(),
            Self::BodyTooLarge { limit } => {
                format!("Request body is larger than the gateway's limit of {limit} bytes.")
            }
            // OpenAI's own wording, which the SDKs and their users recognise.
            Self::NotFound { method, path } => format!("Invalid URL ({method} {path})"),
            Self::MethodNotAllowed => "Method not allowed for this route.".to_owned(),
            Self::BackendUnavailable { backend, detail } => format!("Backend {backend:?} is unavailable: {detail}"),
            Self::BackendTimeout { backend } => format!("Backend {backend:?} did not answer in time."),
            Self::BackendInvalidResponse { backend, detail } => {
                format!("Backend {backend:?} sent an invalid response: {detail}")
            }
            Self::BackendToken { backend, reason, .. } => {
                format!("Could not get a managed identity token for backend {backend:?}: {reason}")
            }
            Self::NoBackendAvailable { target, pool: true, retry_after_secs } => format!(
                "No backend of pool {target:?} is available: their circuit breakers are open after repeated \
                 failures. Try again in {retry_after_secs} seconds."
            ),
            Self::NoBackendAvailable { target, pool: false, retry_after_secs } => format!(
                "Backend {target:?} is unavailable: its circuit breaker is open after repeated failures. \
                 Try again in {retry_after_secs} seconds."
            ),
            // API Management's wording for each limit.
            Self::TokenLimitExceeded { retry_after_secs } => {
                format!("Token limit is exceeded. Try again in {retry_after_secs} seconds.")
            }
            Self::TokenQuotaExceeded { retry_after_secs } => {
                format!("Token quota is exceeded. Try again in {retry_after_secs} seconds.")
            }
            Self::TokensOverLimit { needed, max } => format!(
                "Request too large: it needs an estimated {needed} tokens, but the limit is {max}. \
                 Shorten the prompt or lower max_tokens."
            ),
            Self::RateLimitExceeded { retry_after_secs } => {
                format!("Rate limit is exceeded. Try again in {retry_after_secs} seconds.")
            }
            Self::CallQuotaExceeded { retry_after_secs } => {
                let (h, m, s) = (retry_after_secs / 3600, retry_after_secs / 60 % 60, retry_after_secs % 60);
                format!("Out of call volume quota. Quota will be replenished in {h:02}:{m:02}:{s:02}.")
            }
            Self::LimitStoreUnavailable => {
                "The limit counters are unavailable, and this API refuses requests until they are back.".to_owned()
            }
            Self::AdminApiDisabled => "The admin API is disabled. Enable it by setting an admin key in the \
                configuration: [admin] key-env = \"AIGW_ADMIN_KEY\" (a variable holding the key) or key-sha256 = \
                \"<sha-256 of the key>\"."
                .to_owned(),
            Self::MissingAdminKey => {
                "Access denied due to missing admin key. Send it as `Authorization: Bearer <key>` \
                or `api-key: <key>`."
                    .to_owned()
            }
            Self::InvalidAdminKey => "Access denied due to invalid admin key. The admin API takes the key set in \
                [admin], not a subscription key."
                .to_owned(),
            Self::LedgerUnavailable { detail } => {
                format!("The usage ledger could not be read ({detail}). Try again shortly.")
            }
            Self::Internal => "The gateway hit an internal error.".to_owned(),
        }
    }

    /// Seconds a client should wait before retrying, sent as `Retry-After`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::TokenLimitExceeded { retry_after_secs }
            | Self::TokenQuotaExceeded { retry_after_secs }
            | Self::RateLimitExceeded { retry_after_secs }
            | Self::CallQuotaExceeded { retry_after_secs }
            | Self::TooManyInvalidKeys { retry_after_secs }
            | Self::NoBackendAvailable { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// The JSON body, shared by the HTTP rendering and by error events written into streams.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            r#type: &'static str,
            param: Option<&'a str>,
            code: &'static str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            error: Inner<'a>,
            status_code: u16,
            message: &'a str,
        }
        let message = self.message();
        let body = Body {
            error: Inner { message: &message, r#type: self.kind(), param: self.param(), code: self.code() },
            status_code: self.status().as_u16(),
            message: &message,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.body()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::BodyTooLarge { .. }) {
            // The unread body makes the connection unusable; saying so stops a client from sending
            // its next request down a connection that is about to close.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_and_apim_shapes() {
        let error = GatewayError::invalid("'messages' must be an array", Some("messages"));
        let value: serde_json::Value = serde_json::from_slice(&error.body()).expect("json");
        assert_eq!(value["error"]["message"], "'messages' must be an array");
        assert_eq!(value["error"]["type"], "invalid_request_error");
        assert_eq!(value["error"]["param"], "messages");
        assert_eq!(value["error"]["code"], "invalid_request");
        assert_eq!(value["statusCode"], 400);
        assert_eq!(value["message"], "'messages' must be an array");
        let unauthorized: serde_json::Value =
            serde_json::from_slice(&GatewayError::MissingSubscriptionKey.body()).expect("json");
        assert_eq!(unauthorized["error"]["param"], serde_json::Value::Null);
        assert_eq!(unauthorized["statusCode"], 401);
    }
}
