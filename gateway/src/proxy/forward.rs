//! The backend's answer as the client will get it: its head filtered, its body read whole or
//! handed to a [`StreamRelay`].

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderName, header};
use tokio::sync::mpsc;

use super::failover::send_with_failover;
use super::relay::StreamRelay;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::protocol::sse::SseRelay;
use crate::upstream::backend::{Backend, forwardable_response_header};
use crate::upstream::pool::Target;

/// A response head the outbound policies may edit before it goes to the client.
pub type ResponseHead = http::response::Parts;

/// A backend's answer whose head is in and whose body is not read yet.
pub struct Upstream {
    pub backend: Arc<Backend>,
    /// What the client will get: hop-by-hop headers removed, the backend's `x-request-id` kept
    /// as `x-backend-request-id`.
    pub head: ResponseHead,
    response: reqwest::Response,
}

/// Sends the request to `target` (with failover) and returns the answer's head.
pub async fn forward(ctx: &mut RequestContext, target: &Target) -> Result<Upstream, GatewayError> {
    let (backend, response) = send_with_failover(ctx, target).await?;
    let mut head = Response::new(()).into_parts().0;
    head.status = response.status();
    for (name, value) in response.headers() {
        if name == "x-request-id" {
            // The gateway's own id goes out under this name; keep the backend's for support cases.
            head.headers.append(HeaderName::from_static("x-backend-request-id"), value.clone());
        } else if forwardable_response_header(name) {
            head.headers.append(name.clone(), value.clone());
        }
    }
    Ok(Upstream { backend, head, response })
}

impl Upstream {
    /// A successful server-sent event stream: relayed as it comes, never buffered.
    pub fn is_event_stream(&self) -> bool {
        let event_stream = self
            .head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        event_stream && self.head.status.is_success()
    }

    /// The client's response (its body fed by the relay) and the relay that feeds it; `relay`
    /// reads an OpenAI stream's usage, `None` passes an `http` API's stream as it comes.
    pub fn into_stream(self, relay: Option<SseRelay>) -> (Response, StreamRelay) {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let relay = StreamRelay::new(self.response, relay, tx, self.backend);
        (Response::from_parts(self.head, body), relay)
    }

    /// Reads the whole body, within the backend's timeout from `started` (an `http` API's answer
    /// is not bounded by the request's own timeout, see `Backend::send`) and [`MAX_ANSWER_BYTES`].
    pub async fn into_bytes(self, started: std::time::Instant) -> Result<(ResponseHead, Bytes), GatewayError> {
        let Self { backend, head, response } = self;
        let deadline = tokio::time::Instant::from_std(started) + backend.timeout();
        let bytes = tokio::time::timeout_at(deadline, read_answer(response, &backend))
            .await
            .map_err(|_| GatewayError::BackendTimeout { backend: backend.id.clone() })??;
        Ok((head, bytes))
    }
}

/// Most of a backend's answer the gateway holds in memory: a JSON answer is read whole (for its
/// usage, and for the cache). The largest answer OpenAI sends is a batch of 2048 embeddings of
/// 3072 dimensions as JSON floats, about 126 MiB; beyond this a backend is broken or hostile.
const MAX_ANSWER_BYTES: usize = 128 * 1024 * 1024;

/// The backend's whole answer, or a 502 when it is (or says it will be) over [`MAX_ANSWER_BYTES`].
async fn read_answer(mut upstream: reqwest::Response, backend: &Backend) -> Result<Bytes, GatewayError> {
    let too_large =
        || GatewayError::BackendInvalidResponse { backend: backend.id.clone(), detail: "an answer over 128 MiB" };
    if upstream.content_length().is_some_and(|len| len > MAX_ANSWER_BYTES as u64) {
        return Err(too_large());
    }
    let mut answer = bytes::BytesMut::new();
    while let Some(piece) = upstream.chunk().await.map_err(|e| backend.error(&e))? {
        if answer.len() + piece.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        answer.extend_from_slice(&piece);
    }
    Ok(answer.freeze())
}
