//! Relaying a streamed response from the backend to the client.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::context::RequestContext;
use crate::protocol::sse::SseRelay;
use crate::upstream::backend::Backend;

/// Moves a streamed response from the backend to the client.
pub struct StreamRelay {
    upstream: reqwest::Response,
    relay: SseRelay,
    tx: mpsc::Sender<Result<bytes::Bytes, std::convert::Infallible>>,
    backend: Arc<Backend>,
}

impl StreamRelay {
    pub(super) fn new(
        upstream: reqwest::Response,
        relay: SseRelay,
        tx: mpsc::Sender<Result<bytes::Bytes, std::convert::Infallible>>,
        backend: Arc<Backend>,
    ) -> Self {
        Self { upstream, relay, tx, backend }
    }

    /// Relays until the backend's body ends. A client that leaves (or stops reading until the
    /// backend's deadline) is let go, but the backend is read to its end so the usage is known.
    /// Writes `ctx.usage`, `ctx.answer` and the stream's part of `ctx.outcome`.
    pub async fn relay(self, ctx: &mut RequestContext) {
        let Self { upstream, mut relay, tx, backend } = self;
        let deadline = tokio::time::Instant::from_std(ctx.started) + backend.timeout();
        let mut body = upstream.bytes_stream();
        let mut client_gone = false;
        loop {
            let (out, ended) = match body.next().await {
                Some(Ok(bytes)) => (relay.push(&bytes), false),
                None => (relay.finish(), true),
                Some(Err(error)) => {
                    let error = backend.error(&error);
                    // Tell the client in the stream, as OpenAI does (the SDKs raise on an `error`
                    // event), and never send `[DONE]`: a truncated answer must not look whole.
                    // The half-received event, if any, is dropped: it cannot be completed.
                    let mut event = bytes::BytesMut::from(&b"data: "[..]);
                    event.extend_from_slice(&error.body());
                    event.extend_from_slice(b"\n\n");
                    (event.freeze(), true)
                }
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
}
