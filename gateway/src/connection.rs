//! Keeping a client's connection usable after an answer that did not need the request body.
//!
//! A request refused before its body was read (no key, a bad key, an unknown route) leaves the
//! body on the connection. HTTP/1.1 cannot carry the next request until it is gone, so the server
//! would close the connection after the answer, and a pooled client that was not told so sends its
//! next request down a dead connection ("server disconnected"). A small body is read and
//! discarded, keeping the connection alive; a large or slow one is not worth reading, and the
//! answer says `Connection: close` instead.

use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, HeaderValue, header};

/// Bodies up to this size are read and dropped to keep the connection; larger ones close it.
const DISCARD_MAX_BYTES: usize = 64 * 1024;
/// How long a client may take to deliver a body that is only being discarded.
const DISCARD_WITHIN: Duration = Duration::from_millis(500);

/// Reads and drops `body` when it is small and arrives promptly; otherwise marks `response`
/// `Connection: close`. `request` is the request's headers.
pub async fn settle_unread_body(body: Body, request: &HeaderMap, response: &mut HeaderMap) {
    let declared = request.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = request.contains_key(header::TRANSFER_ENCODING);
    if declared == Some(0) || (declared.is_none() && !chunked) {
        return;
    }
    if declared.is_none_or(|len| len <= DISCARD_MAX_BYTES as u64) {
        let read = tokio::time::timeout(DISCARD_WITHIN, axum::body::to_bytes(body, DISCARD_MAX_BYTES)).await;
        if matches!(read, Ok(Ok(_))) {
            return;
        }
    }
    response.insert(header::CONNECTION, HeaderValue::from_static("close"));
}
