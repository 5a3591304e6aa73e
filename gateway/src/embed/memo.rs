//! Recent embeddings remembered by text. The same prompt comes back often (a popular question,
//! an agent's retries, a cache hit's repeats), and embedding it again would cost the model's
//! 10-20 ms of CPU to learn what is already known: a repeat costs a hash lookup instead.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::{EmbedError, Embedder};

type Key = [u8; 32];

/// An [`Embedder`] that remembers the last `capacity` texts it embedded (oldest forgotten first).
pub struct Memoized {
    inner: Arc<dyn Embedder>,
    capacity: usize,
    memo: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    vectors: HashMap<Key, Arc<[f32]>>,
    order: VecDeque<Key>,
}

impl Memoized {
    pub fn new(inner: Arc<dyn Embedder>, capacity: usize) -> Self {
        Self { inner, capacity: capacity.max(1), memo: Mutex::default() }
    }

    fn recall(&self, key: &Key) -> Option<Arc<[f32]>> {
        self.memo.lock().ok()?.vectors.get(key).cloned()
    }

    fn remember(&self, key: Key, vector: Arc<[f32]>) {
        let Ok(mut memo) = self.memo.lock() else { return };
        if memo.vectors.insert(key, vector).is_some() {
            return;
        }
        memo.order.push_back(key);
        while memo.order.len() > self.capacity {
            if let Some(oldest) = memo.order.pop_front() {
                memo.vectors.remove(&oldest);
            }
        }
    }
}

#[async_trait::async_trait]
impl Embedder for Memoized {
    fn space(&self) -> &str {
        self.inner.space()
    }

    fn truncates(&self, text: &str) -> bool {
        self.inner.truncates(text)
    }

    async fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let key: Key = Sha256::digest(text.as_bytes()).into();
        if let Some(vector) = self.recall(&key) {
            return Ok(vector.to_vec());
        }
        let vector = self.inner.embed(text).await?;
        self.remember(key, Arc::from(vector.as_slice()));
        Ok(vector)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts the embeddings it computes; the vector's first value tells which call made it.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait::async_trait]
    impl Embedder for Counting {
        fn space(&self) -> &str {
            "counting"
        }

        async fn embed(&self, _text: &str) -> Result<Vec<f32>, EmbedError> {
            Ok(vec![self.0.fetch_add(1, Ordering::SeqCst) as f32])
        }
    }

    #[tokio::test]
    async fn repeats_are_not_embedded_again_and_the_oldest_is_forgotten_first() {
        let inner = Arc::new(Counting::default());
        let memo = Memoized::new(inner.clone(), 2);
        assert_eq!(memo.embed("a").await.expect("a"), vec![0.0]);
        assert_eq!(memo.embed("a").await.expect("a again"), vec![0.0]);
        assert_eq!(memo.embed("b").await.expect("b"), vec![1.0]);
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
        assert_eq!(memo.embed("c").await.expect("c"), vec![2.0]);
        assert_eq!(memo.embed("b").await.expect("b remembered"), vec![1.0]);
        assert_eq!(memo.embed("a").await.expect("a forgotten"), vec![3.0]);
        assert_eq!(memo.space(), "counting");
    }
}
