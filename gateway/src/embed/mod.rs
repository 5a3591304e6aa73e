//! Embeddings for the semantic cache: a local model run in-process ([`LocalEmbedder`]) or an
//! OpenAI-compatible `/embeddings` backend ([`BackendEmbedder`]), behind one [`Embedder`] trait.

mod backend;
mod local;
mod memo;

use std::fmt;
use std::path::PathBuf;

pub use backend::BackendEmbedder;
pub use local::{INSTALL_COMMAND, LocalEmbedder, LocalModel, MODEL_DIR_ENV};
pub use memo::Memoized;

#[async_trait::async_trait]
pub trait Embedder: Send + Sync {
    /// Identifies the vector space (model + source), e.g. "local:all-MiniLM-L6-v2" or "backend:<id>:<model>"; the cache
    /// puts it in the partition so vectors from different models are never compared.
    fn space(&self) -> &str;

    /// Whether `text` is longer than the model reads (it would be silently truncated): the cache then bypasses.
    fn truncates(&self, _text: &str) -> bool {
        false
    }

    /// The L2-normalised embedding of `text`.
    async fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError>;
}

#[derive(Debug)]
pub enum EmbedError {
    /// The local model's files are nowhere to be found; each entry says where it looked and why that failed.
    ModelNotFound { looked: Vec<String> },
    /// The model directory holds the files but they cannot be read or do not describe a usable model.
    ModelLoad { dir: PathBuf, detail: String },
    /// Tokenising or running the local model failed.
    Inference(String),
    /// The embeddings backend could not be reached or did not answer in time.
    BackendUnavailable { backend: String, detail: &'static str },
    /// No credential for the embeddings backend (its managed identity token could not be had).
    BackendCredential(String),
    /// The embeddings backend answered with an error status; `message` is the OpenAI error message, if any.
    BackendStatus { backend: String, status: u16, message: Option<String> },
    /// The embeddings backend answered 2xx with something that is not a usable embedding.
    BadResponse { backend: String, detail: String },
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ModelNotFound { looked } => write!(
                f,
                "the local embeddings model ({}) was not found: install it with `{INSTALL_COMMAND}` in the working \
                 directory, or set embeddings.model-path to a directory holding {} (looked at: {})",
                local::MODEL_NAME,
                local::MODEL_FILES.join(", "),
                looked.join("; ")
            ),
            Self::ModelLoad { dir, detail } => {
                write!(f, "cannot load the local embeddings model from {}: {detail}", dir.display())
            }
            Self::Inference(detail) => write!(f, "the local embeddings model failed: {detail}"),
            Self::BackendUnavailable { backend, detail } => {
                write!(f, "embeddings backend {backend:?} is unavailable: {detail}")
            }
            Self::BackendCredential(message) => write!(f, "embeddings: {message}"),
            Self::BackendStatus { backend, status, message: Some(message) } => {
                write!(f, "embeddings backend {backend:?} answered {status}: {message}")
            }
            Self::BackendStatus { backend, status, message: None } => {
                write!(f, "embeddings backend {backend:?} answered {status}")
            }
            Self::BadResponse { backend, detail } => {
                write!(f, "embeddings backend {backend:?} sent an unusable answer: {detail}")
            }
        }
    }
}

impl std::error::Error for EmbedError {}

/// Scales `vector` to unit length; `None` when it has no direction (all zeros) or holds a NaN or infinity, which no
/// similarity can be computed from.
pub fn normalized(mut vector: Vec<f32>) -> Option<Vec<f32>> {
    let norm = vector.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return None;
    }
    for x in &mut vector {
        *x = (f64::from(*x) / norm) as f32;
    }
    Some(vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_has_unit_length_and_keeps_direction() {
        let v = normalized(vec![3.0, 4.0]).expect("non-zero");
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(normalized(vec![0.0, 0.0]), None);
        assert_eq!(normalized(vec![f32::NAN, 1.0]), None);
        assert_eq!(normalized(vec![f32::INFINITY, 1.0]), None);
    }
}
