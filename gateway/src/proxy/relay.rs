//! Relaying a streamed response from the backend to the client: an OpenAI stream read for its
//! usage (and assembled when a policy wants the answer), or an `http` API's stream as it comes.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::protocol::sse::SseRelay;
use crate::upstream::backend::Backend;

/// Moves a streamed response from the backend to the client.
pub struct StreamRelay {
    upstream: reqwest::Response,
    /// Reads an OpenAI stream's usage; `None` for an `http` API's stream, passed as it comes.
    relay: Option<SseRelay>,
    /// An error aborts the client's response, so a cut pass-through stream does not look whole.
    tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    backend: Arc<Backend>,
}

impl StreamRelay {
    pub(super) fn new(
        upstream: reqwest::Response,
        relay: Option<SseRelay>,
        tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        backend: Arc<Backend>,
    ) -> Self {
        Self { upstream, relay, tx, backend }
    }

    /// Relays until the stream is over (see [`relay_openai`] and [`relay_passthrough`]); writes
    /// `ctx.usage`, `ctx.answer` and the stream's part of `ctx.outcome`.
    pub async fn relay(self, ctx: &mut RequestContext) {
        let Self { upstream, relay, tx, backend } = self;
        match relay {
            Some(relay) => relay_openai(upstream, relay, tx, &backend, ctx).await,
            None => relay_passthrough(upstream, tx, &backend, ctx).await,
        }
    }
}

/// An `http` API's stream (an agent's SSE, an MCP server's stream) goes to the client as it
/// comes, unread: it has no usage and no `[DONE]`, and is complete when the backend ends its body
/// cleanly. It is bounded by `stream-idle-timeout-secs` between chunks rather than by the total
/// timeout, which would cut a long-lived stream that keeps sending. A client that leaves lets the
/// backend go at once: there is no usage to wait for, and an MCP GET stream never ends.
async fn relay_passthrough(
    upstream: reqwest::Response,
    tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    backend: &Backend,
    ctx: &mut RequestContext,
) {
    let idle = backend.stream_idle_timeout();
    let mut body = upstream.bytes_stream();
    let (mut complete, mut client_gone) = (false, false);
    loop {
        let next = tokio::select! {
            () = tx.closed() => {
                client_gone = true;
                break;
            }
            next = tokio::time::timeout(idle, body.next()) => next,
        };
        let bytes = match next {
            Ok(Some(Ok(bytes))) => bytes,
            Ok(None) => {
                complete = true;
                break;
            }
            Ok(Some(Err(error))) => {
                let _logged = backend.error(&error);
                break;
            }
            Err(_) => {
                tracing::warn!(
                    request_id = %ctx.request_id, backend = %backend.id, idle_secs = idle.as_secs(),
                    "pass-through stream ended: the backend sent nothing for stream-idle-timeout-secs"
                );
                break;
            }
        };
        if !matches!(tokio::time::timeout(idle, tx.send(Ok(bytes))).await, Ok(Ok(()))) {
            client_gone = true;
            break;
        }
    }
    if !complete && !client_gone {
        let _ = tx.try_send(Err(std::io::Error::other("the backend's stream was cut")));
    }
    ctx.outcome.client_disconnected = client_gone;
    ctx.outcome.stream_incomplete = !complete && !client_gone;
}

/// Relays an OpenAI stream until the backend's body ends. A client that leaves (or stops reading
/// until the backend's deadline) is let go, but the backend is read to its end so the usage is
/// known.
async fn relay_openai(
    upstream: reqwest::Response,
    mut relay: SseRelay,
    tx: mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    backend: &Backend,
    ctx: &mut RequestContext,
) {
    let deadline = tokio::time::Instant::from_std(ctx.started) + backend.timeout();
    let mut body = upstream.bytes_stream();
    let mut client_gone = false;
    loop {
        // A stream that breaks off or breaks a bound ends with an error event and never with
        // `[DONE]`: a truncated answer must not look whole. The half-received event, if any,
        // is dropped: it cannot be completed. The backend is not read any further.
        let (out, ended) = match body.next().await {
            Some(Ok(bytes)) => match relay.push(&bytes) {
                Ok(out) => (out, false),
                Err(detail) => (error_event(&invalid_stream(backend, detail)), true),
            },
            None => match relay.finish() {
                Ok(out) => (out, true),
                Err(detail) => (error_event(&invalid_stream(backend, detail)), true),
            },
            Some(Err(error)) => (error_event(&backend.error(&error)), true),
        };
        if !out.is_empty() && !client_gone {
            let sent = tokio::time::timeout_at(deadline, tx.send(Ok(out))).await;
            client_gone = !matches!(sent, Ok(Ok(())));
        }
        if ended {
            break;
        }
    }
    ctx.usage = relay.usage();
    ctx.answer = relay.assembled();
    ctx.outcome.client_disconnected = client_gone;
    ctx.outcome.stream_incomplete = !relay.saw_done();
}

/// A stream that broke one of the relay's bounds (`detail`), logged as transport errors are.
fn invalid_stream(backend: &Backend, detail: &'static str) -> GatewayError {
    tracing::warn!(backend = %backend.id, detail, "backend stream refused: it broke a bound of the relay");
    GatewayError::BackendInvalidResponse { backend: backend.id.clone(), detail }
}

/// An OpenAI `error` event: how a stream that cannot go on tells the client (the SDKs raise on it).
fn error_event(error: &GatewayError) -> bytes::Bytes {
    let mut event = bytes::BytesMut::from(&b"data: "[..]);
    event.extend_from_slice(&error.body());
    event.extend_from_slice(b"\n\n");
    event.freeze()
}
