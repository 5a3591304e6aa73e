//! What the gateway knows about the protocols it speaks: which routes exist, what operation and
//! route a request is, how its body is validated and parsed ([`parse_payload`]), and the OpenAI
//! wire types ([`openai`]), server-sent events ([`sse`]) and prompt-token estimates ([`tokens`]).

pub mod openai;
pub mod sse;
pub mod tokens;

use bytes::Bytes;

use crate::context::Payload;
use crate::error::GatewayError;
use openai::{ChatRequest, EmbeddingsRequest};

/// What the client called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Embeddings,
    ListModels,
    /// Any method and path under an `http` API's prefix.
    Passthrough,
}

impl Operation {
    pub fn id(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat-completions",
            Self::Embeddings => "embeddings",
            Self::ListModels => "list-models",
            Self::Passthrough => "passthrough",
        }
    }
}

/// Which family of routes the request came in on; decides how the backend URL is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v1/...`
    OpenAi,
    /// `/openai/deployments/{deployment}/...?api-version=...`
    AzureDeployment { deployment: String },
    /// `/openai/v1/...`
    AzureV1,
    /// Under an `http` API's prefix; the rest of the path (starting with `/`, or empty).
    Passthrough { rest: String },
}

impl Route {
    /// Refuses client text that would leave the backend's base path once put into a URL (see
    /// `backend_url`), before any policy runs or any backend is called; decodes the deployment
    /// name, which the backend URL builder encodes again as exactly one segment.
    pub fn check(&mut self) -> Result<(), GatewayError> {
        let refused = |refusal: backend_url::Refusal| GatewayError::invalid(refusal.to_string(), None);
        match self {
            Self::Passthrough { rest } => backend_url::check_client_path(rest).map_err(refused),
            Self::AzureDeployment { deployment } => {
                let decoded = backend_url::percent_decode(deployment).map_err(refused)?;
                backend_url::check_name(&decoded).map_err(|refusal| match refusal {
                    backend_url::Refusal::BadLength => GatewayError::invalid(
                        format!("The deployment name must be 1 to {} characters long.", backend_url::MAX_NAME_LEN),
                        Some("deployment"),
                    ),
                    other => refused(other),
                })?;
                *deployment = decoded;
                Ok(())
            }
            Self::OpenAi | Self::AzureV1 => Ok(()),
        }
    }
}

/// One route of an `openai` API, relative to the API's path prefix: its path pattern, its
/// operation, and how its [`Route`] is read from the request's path after the prefix.
pub struct OpenAiRoute {
    pub path: &'static str,
    pub operation: Operation,
    pub route: fn(&str) -> Route,
}

/// Where an Azure deployment route's deployment name starts, after the API's path prefix.
const DEPLOYMENTS: &str = "/openai/deployments/";

/// The deployment name as the client sent it, percent-encoded: [`Route::check`] decodes and
/// checks it (axum's own extractors would decode it first, and refuse non-UTF-8 in their own words).
fn deployment(path: &str) -> Route {
    let deployment = path.strip_prefix(DEPLOYMENTS).and_then(|rest| rest.split('/').next()).unwrap_or_default();
    Route::AzureDeployment { deployment: deployment.to_owned() }
}

/// The OpenAI-kind routes, relative to the API's path prefix.
pub const OPENAI_ROUTES: [OpenAiRoute; 8] = [
    OpenAiRoute { path: "/v1/chat/completions", operation: Operation::ChatCompletions, route: |_| Route::OpenAi },
    OpenAiRoute { path: "/v1/embeddings", operation: Operation::Embeddings, route: |_| Route::OpenAi },
    OpenAiRoute { path: "/v1/models", operation: Operation::ListModels, route: |_| Route::OpenAi },
    OpenAiRoute {
        path: "/openai/deployments/{deployment}/chat/completions",
        operation: Operation::ChatCompletions,
        route: deployment,
    },
    OpenAiRoute {
        path: "/openai/deployments/{deployment}/embeddings",
        operation: Operation::Embeddings,
        route: deployment,
    },
    OpenAiRoute {
        path: "/openai/v1/chat/completions",
        operation: Operation::ChatCompletions,
        route: |_| Route::AzureV1,
    },
    OpenAiRoute { path: "/openai/v1/embeddings", operation: Operation::Embeddings, route: |_| Route::AzureV1 },
    OpenAiRoute { path: "/openai/v1/models", operation: Operation::ListModels, route: |_| Route::AzureV1 },
];

/// Validates and parses a request body for its operation. Azure's deployment routes also need
/// an `api-version` in the query.
pub fn parse_payload(
    operation: Operation,
    route: &Route,
    query: Option<&str>,
    raw: &Bytes,
) -> Result<Payload, GatewayError> {
    let deployment = match route {
        Route::AzureDeployment { deployment } => {
            let has_api_version = query.is_some_and(|q| {
                q.split('&').any(|pair| pair.split_once('=').is_some_and(|(k, v)| k == "api-version" && !v.is_empty()))
            });
            if !has_api_version {
                return Err(GatewayError::invalid(
                    "Missing required query parameter 'api-version' (e.g. ?api-version=2024-10-21).",
                    Some("api-version"),
                ));
            }
            Some(deployment.as_str())
        }
        _ => None,
    };
    Ok(match operation {
        Operation::ChatCompletions => Payload::Chat(ChatRequest::parse(raw, deployment)?),
        Operation::Embeddings => Payload::Embeddings(EmbeddingsRequest::parse(raw, deployment)?),
        Operation::ListModels | Operation::Passthrough => Payload::Opaque,
    })
}
