//! The semantic cache behind `semantic-cache-lookup` and `semantic-cache-store`
//! (`policy::semantic_cache`): where entries live (`store`), when a similar prompt may be served
//! (`guard`), what an entry holds and how a hit is replayed (`answer`), and the offline check of
//! the hit decision on labelled pairs (`eval`, `aigw cache-eval`).

pub mod answer;
pub mod eval;
pub mod guard;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::EmbeddingsConfig;
use crate::embed::{BackendEmbedder, Embedder, LocalEmbedder, LocalModel, Memoized};
use crate::upstream::backend::Backend;

/// Prompts whose embeddings each source remembers (384 floats each: about 1.6 KiB apiece).
const REMEMBERED_EMBEDDINGS: usize = 4_096;
use store::CacheStore;

/// What the cache policies are built with: the one store of the process (chosen at start-up,
/// only when some API uses the cache) and the backends an embeddings source may name.
pub struct CacheDeps {
    store: Option<Arc<dyn CacheStore>>,
    backends: BTreeMap<String, Arc<Backend>>,
}

impl CacheDeps {
    pub fn new(store: Option<Arc<dyn CacheStore>>, backends: BTreeMap<String, Arc<Backend>>) -> Self {
        Self { store, backends }
    }

    pub fn store(&self) -> Result<Arc<dyn CacheStore>, String> {
        self.store.clone().ok_or_else(|| "the semantic cache store was not set up".to_owned())
    }

    /// The embeddings source a lookup policy names; the local model is loaded once per process.
    pub fn embedder(&self, config: &EmbeddingsConfig) -> Result<Arc<dyn Embedder>, String> {
        embedder(config, &self.backends)
    }
}

/// Builds an embeddings source from config (also used by `aigw cache-eval`); repeated prompts
/// are not embedded twice.
pub fn embedder(
    config: &EmbeddingsConfig,
    backends: &BTreeMap<String, Arc<Backend>>,
) -> Result<Arc<dyn Embedder>, String> {
    let source: Arc<dyn Embedder> = match config {
        EmbeddingsConfig::Local { model_path } => {
            let model = LocalModel::shared(model_path.as_deref()).map_err(|e| e.to_string())?;
            Arc::new(LocalEmbedder::new(model))
        }
        EmbeddingsConfig::Backend { backend_id, model } => {
            let backend = backends.get(backend_id).ok_or_else(|| format!("unknown backend {backend_id:?}"))?;
            Arc::new(BackendEmbedder::new(backend.clone(), model.clone()))
        }
    };
    Ok(Arc::new(Memoized::new(source, REMEMBERED_EMBEDDINGS)))
}
