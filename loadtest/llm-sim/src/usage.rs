//! The provider's side of the bill: prompt caching as OpenAI reports it, and the totals of the
//! usage this simulator reported, per caller-chosen tag.
//!
//! Tally: a request carrying `x-sim-tally: <tag>` adds its usage to the tag's totals when that
//! usage is actually sent (a JSON body; a stream's usage chunk; nothing for a dropped response),
//! and `GET /sim/usage` returns every tag's totals, with the tag's requests still in progress
//! (`in_flight`). Tests compare a gateway's own accounting to them, to the token: it is the figure
//! a provider would invoice.
//!
//! Prompt caching: like OpenAI, prompts of 1024 tokens or more whose leading messages (all but
//! the last) were seen recently report those tokens, in 128-token increments, as
//! `prompt_tokens_details.cached_tokens`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName};
use serde::Serialize;

use crate::api::AppState;

pub const X_SIM_TALLY: HeaderName = HeaderName::from_static("x-sim-tally");

/// OpenAI caches prompts from this length on, in increments of [`CACHE_INCREMENT`].
const MIN_CACHED_PROMPT: usize = 1024;
const CACHE_INCREMENT: usize = 128;
/// Prefixes remembered before the cache starts over (a real cache evicts within minutes too).
const MAX_CACHED_PREFIXES: usize = 100_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
    /// Requests being answered: their usage is not reported yet.
    pub in_flight: u64,
}

/// Usage totals per tag.
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, Totals>>);

/// One response's usage, to be added to its tag's totals once it is sent; in flight until then
/// (a response dropped before its usage went out leaves without adding anything).
pub struct Pending {
    tally: Arc<Tally>,
    tag: String,
    usage: Option<Totals>,
}

impl Pending {
    pub fn report(mut self) {
        self.settle();
    }

    fn settle(&mut self) {
        let mut tags = self.tally.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let totals = tags.entry(std::mem::take(&mut self.tag)).or_default();
        totals.in_flight = totals.in_flight.saturating_sub(1);
        if let Some(usage) = self.usage.take() {
            totals.requests += 1;
            totals.prompt_tokens += usage.prompt_tokens;
            totals.completion_tokens += usage.completion_tokens;
            totals.total_tokens += usage.total_tokens;
            totals.cached_tokens += usage.cached_tokens;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.usage.is_some() {
            self.usage = None;
            self.settle();
        }
    }
}

impl Tally {
    /// What to report for a request, if it carries a tag.
    pub fn pending(
        self: &Arc<Self>,
        headers: &HeaderMap,
        prompt: usize,
        completion: usize,
        cached: usize,
    ) -> Option<Pending> {
        let tag = headers.get(X_SIM_TALLY)?.to_str().ok()?.to_owned();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let usage = Totals {
            requests: 1,
            prompt_tokens: count(prompt),
            completion_tokens: count(completion),
            total_tokens: count(prompt + completion),
            cached_tokens: count(cached),
            in_flight: 0,
        };
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(tag.clone()).or_default().in_flight += 1;
        Some(Pending { tally: self.clone(), tag, usage: Some(usage) })
    }
}

/// `GET /sim/usage`: `{"<tag>": {"requests", "prompt_tokens", ...}}`.
pub async fn totals(State(state): State<Arc<AppState>>) -> Json<BTreeMap<String, Totals>> {
    Json(state.tally.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
}

/// Hashes of recently seen prompt prefixes.
#[derive(Default)]
pub struct PromptCache(Mutex<HashSet<[u8; 32]>>);

impl PromptCache {
    /// The cached tokens to report for a prompt of `prompt_tokens` whose leading messages (`prefix`
    /// hashed, `prefix_tokens` long) may have been seen before; remembers the prefix.
    pub fn cached_tokens(&self, prefix: [u8; 32], prefix_tokens: usize, prompt_tokens: usize) -> usize {
        if prompt_tokens < MIN_CACHED_PROMPT || prefix_tokens < MIN_CACHED_PROMPT {
            return 0;
        }
        let mut seen = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= MAX_CACHED_PREFIXES {
            seen.clear();
        }
        if seen.insert(prefix) { 0 } else { prefix_tokens / CACHE_INCREMENT * CACHE_INCREMENT }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_long_prompts_with_a_seen_prefix_are_cached_in_increments() {
        let cache = PromptCache::default();
        assert_eq!(cache.cached_tokens([1; 32], 2000, 2100), 0, "first sight");
        assert_eq!(cache.cached_tokens([1; 32], 2000, 2100), 1920, "seen: 15 x 128");
        assert_eq!(cache.cached_tokens([2; 32], 500, 2100), 0, "prefix too short");
        assert_eq!(cache.cached_tokens([2; 32], 500, 2100), 0, "still too short");
    }

    #[test]
    fn tally_adds_only_tagged_reported_usage() {
        let tally = Arc::new(Tally::default());
        let mut headers = HeaderMap::new();
        assert!(tally.pending(&headers, 10, 5, 0).is_none());
        headers.insert(X_SIM_TALLY, "team-a".parse().expect("header"));
        let pending = tally.pending(&headers, 10, 5, 2).expect("tagged");
        let unsent = tally.pending(&headers, 100, 50, 0).expect("tagged");
        assert_eq!(tally.0.lock().expect("lock")["team-a"].in_flight, 2);
        pending.report();
        drop(unsent);
        let totals = tally.0.lock().expect("lock")["team-a"];
        assert_eq!(
            totals,
            Totals {
                requests: 1,
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                cached_tokens: 2,
                in_flight: 0
            }
        );
    }
}
