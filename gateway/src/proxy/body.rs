//! Reading the client's body: once, on first need, and never more than the configured bound.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header};

use crate::error::GatewayError;

/// Reads `body` whole; a declared or actual length above `max_body_bytes` is a 413 before (or
/// instead of) reading the rest.
pub async fn read_bounded(body: Body, headers: &HeaderMap, max_body_bytes: usize) -> Result<Bytes, GatewayError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body_bytes as u64) {
        return Err(GatewayError::BodyTooLarge { limit: max_body_bytes });
    }
    axum::body::to_bytes(body, max_body_bytes).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            GatewayError::BodyTooLarge { limit: max_body_bytes }
        } else {
            GatewayError::invalid("The request body could not be read.", None)
        }
    })
}
