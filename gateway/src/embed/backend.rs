//! Embeddings from a configured backend's OpenAI-compatible `/embeddings` endpoint, with that backend's credential.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::{EmbedError, Embedder, normalized};
use crate::upstream::backend::Backend;

/// The longest backend error message passed on; OpenAI's are a sentence or two.
const MAX_MESSAGE_CHARS: usize = 300;

pub struct BackendEmbedder {
    backend: Arc<Backend>,
    /// The model (an Azure deployment for the azure-openai kind); `None` leaves the choice to the backend.
    model: Option<String>,
    space: String,
}

impl BackendEmbedder {
    pub fn new(backend: Arc<Backend>, model: Option<String>) -> Self {
        let space = match &model {
            Some(model) => format!("backend:{}:{model}", backend.id),
            None => format!("backend:{}", backend.id),
        };
        Self { backend, model, space }
    }

    fn unusable(&self, detail: impl Into<String>) -> EmbedError {
        EmbedError::BadResponse { backend: self.backend.id.clone(), detail: detail.into() }
    }

    fn unavailable(&self, error: &reqwest::Error) -> EmbedError {
        tracing::warn!(backend = %self.backend.id, error = %error, source = ?std::error::Error::source(error), "embeddings request failed");
        let detail = if error.is_timeout() {
            "it did not answer in time"
        } else if error.is_connect() {
            "could not connect"
        } else {
            "the connection failed"
        };
        EmbedError::BackendUnavailable { backend: self.backend.id.clone(), detail }
    }
}

#[derive(Serialize)]
struct EmbeddingRequest<'a> {
    input: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    encoding_format: &'static str,
}

#[derive(Deserialize)]
struct EmbeddingList {
    data: Vec<Embedding>,
}

#[derive(Deserialize)]
struct Embedding {
    embedding: Vector,
}

/// A float array, or (for `encoding_format: "base64"`, which some servers use regardless) the base64 of its
/// little-endian f32 bytes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: String,
}

#[async_trait::async_trait]
impl Embedder for BackendEmbedder {
    fn space(&self) -> &str {
        &self.space
    }

    async fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let request = EmbeddingRequest { input: text, model: self.model.as_deref(), encoding_format: "float" };
        let body =
            serde_json::to_vec(&request).map_err(|e| self.unusable(format!("cannot encode the request: {e}")))?;
        let request = self
            .backend
            .embeddings_request(self.model.as_deref(), body)
            .await
            .map_err(|e| EmbedError::BackendCredential(e.message()))?;
        let response = request.send().await.map_err(|e| self.unavailable(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.unavailable(&e))?;
        if !status.is_success() {
            // Only the OpenAI error message: the rest of an error body may echo the request.
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .ok()
                .map(|b| b.error.message.chars().take(MAX_MESSAGE_CHARS).collect());
            return Err(EmbedError::BackendStatus {
                backend: self.backend.id.clone(),
                status: status.as_u16(),
                message,
            });
        }
        let list: EmbeddingList =
            serde_json::from_slice(&body).map_err(|e| self.unusable(format!("not an embeddings list: {e}")))?;
        let vector = match list.data.into_iter().next().map(|d| d.embedding) {
            None => return Err(self.unusable("no embedding in `data`")),
            Some(Vector::Float(v)) => v,
            Some(Vector::Base64(encoded)) => {
                decode_base64(&encoded).ok_or_else(|| self.unusable("bad base64 vector"))?
            }
        };
        normalized(vector).ok_or_else(|| self.unusable("an empty, zero or non-finite vector"))
    }
}

/// Little-endian f32s from base64; `None` unless it decodes to whole f32s.
fn decode_base64(encoded: &str) -> Option<Vec<f32>> {
    let bytes = BASE64.decode(encoded).ok()?;
    let floats = bytes.chunks_exact(4);
    floats.remainder().is_empty().then(|| floats.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors_decode_as_little_endian_f32() {
        let floats = [0.25f32, -1.5, 3.0];
        let bytes: Vec<u8> = floats.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(decode_base64(&BASE64.encode(bytes)), Some(floats.to_vec()));
        assert_eq!(decode_base64(&BASE64.encode([1u8, 2, 3])), None, "not a whole f32");
        assert_eq!(decode_base64("not base64!"), None);
    }
}
