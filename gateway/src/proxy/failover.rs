//! Sending a request to a backend or a pool, with failover between a pool's members.

use std::sync::Arc;

use crate::config::BackendKind;
use crate::context::{Payload, RequestBody, RequestContext};
use crate::error::GatewayError;
use crate::protocol::Route;
use crate::upstream::backend::Backend;
use crate::upstream::circuit::Attempt;
use crate::upstream::pool::Target;

/// Sends the request to the target's backends until one answers with something other than 429,
/// 5xx or a transport error: a pool's next available member (by priority and weight), never the
/// same backend twice, at most `max-attempts` times. Nothing has reached the client yet (a
/// stream's status comes before its body), so a failed attempt is invisible to it; the buffered
/// body is sent again. Every answer goes into the backend's circuit breaker.
///
/// When attempts run out, the client gets the last backend's answer, unless every member of the
/// pool is now tripped (or none was available to begin with): then a 503 with `Retry-After`.
pub async fn send_with_failover(
    ctx: &mut RequestContext,
    target: &Target,
) -> Result<(Arc<Backend>, reqwest::Response), GatewayError> {
    let mut tried = Vec::new();
    let mut last = None;
    for _ in 0..target.max_attempts() {
        let Some((backend, permit)) = target.next(&mut tried) else { break };
        ctx.backend = Some(backend.clone());
        let body = backend_body(ctx, backend);
        let sent = backend.send(ctx, body).await;
        let failed = match &sent {
            Ok(response) => {
                permit.record(&Attempt::Response(response.status(), response.headers()));
                let status = response.status();
                (status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()).then(|| status.to_string())
            }
            Err(
                error @ (GatewayError::BackendTimeout { .. }
                | GatewayError::BackendUnavailable { .. }
                | GatewayError::BackendInvalidResponse { .. }),
            ) => {
                permit.record(&Attempt::TransportError);
                Some(error.code().to_owned())
            }
            // Not the backend's doing (the permit is dropped unreported).
            Err(_) => None,
        };
        let Some(failure) = failed else { return sent.map(|response| (backend.clone(), response)) };
        if let Target::Pool(pool) = target {
            tracing::warn!(
                request_id = %ctx.request_id, pool = %pool.id, backend = %backend.id, failure = %failure,
                "pool member failed; the request goes to the next available member, if any"
            );
        }
        last = Some((backend.clone(), sent));
    }
    match last {
        Some((backend, sent)) if matches!(target, Target::Backend(_)) || target.available() => {
            sent.map(|response| (backend, response))
        }
        _ => Err(GatewayError::NoBackendAvailable {
            target: target.id().to_owned(),
            pool: matches!(target, Target::Pool(_)),
            retry_after_secs: target.retry_after_secs(),
        }),
    }
}

/// The body the backend gets: the client's, unless streams need usage or the backend needs the
/// deployment name as the model.
fn backend_body(ctx: &RequestContext, backend: &Backend) -> bytes::Bytes {
    let RequestBody::Read { raw, payload } = &ctx.request.body else { return bytes::Bytes::new() };
    let model_to_add = match (&ctx.request.route, backend.kind) {
        (Route::AzureDeployment { deployment, .. }, BackendKind::Openai) => Some(deployment.as_str()),
        _ => None,
    };
    match payload {
        Payload::Chat(chat) => chat.backend_body(raw, model_to_add),
        Payload::Embeddings(embeddings) => embeddings.backend_body(raw, model_to_add),
        Payload::Opaque => raw.clone(),
    }
}
