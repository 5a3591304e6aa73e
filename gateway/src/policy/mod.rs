//! Policies: the contract every policy implements ([`Policy`]), the registry that builds one from
//! its config section ([`build_policy`]), and the [`pipeline`] that runs an API's policies around
//! the proxy engine (`crate::proxy`).
//!
//! Adding a policy: a module here implementing [`Policy`] with a constructor that takes its config
//! section and reports errors by field name, a variant in `config::PolicyConfig`, and a line in
//! [`build_policy`].

pub mod call_limit;
pub mod emit_token_metric;
pub mod pipeline;
pub mod semantic_cache;
pub mod set_backend_service;
pub mod set_header;
pub mod set_variable;
pub mod subscription_key;
pub mod template;
pub mod token_limit;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::response::Response;
use tokio_util::task::TaskTracker;

use crate::access_log::RequestLog;
use crate::cache::CacheDeps;
use crate::config::PolicyConfig;
use crate::context::RequestContext;
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::limits::Counters;
use crate::metrics::Metrics;
use crate::subscription::SubscriptionStore;
use crate::upstream::pool::Target;

pub use crate::proxy::forward::ResponseHead;
pub use pipeline::Pipeline;

/// What an inbound policy decided.
pub enum Flow {
    Continue,
    /// Answer the client now, without calling the backend.
    Respond(Response),
}

/// One policy. Each phase has a default that does nothing, so a policy implements only the
/// phases it acts in; the pipeline calls the phase of the section it is configured in.
#[async_trait]
pub trait Policy: Send + Sync {
    /// Whether `inbound` needs the request body read and parsed first.
    fn reads_body(&self) -> bool {
        true
    }

    async fn inbound(&self, _ctx: &mut RequestContext) -> Result<Flow, GatewayError> {
        Ok(Flow::Continue)
    }

    async fn outbound(&self, _ctx: &mut RequestContext, _response: &mut ResponseHead) -> Result<(), GatewayError> {
        Ok(())
    }

    async fn on_error(&self, _ctx: &mut RequestContext, _error: &GatewayError, _response: &mut ResponseHead) {}

    /// Headers this policy puts on the response, whatever section it is configured in and whether
    /// the request succeeded or not: how limit policies in inbound report what is left.
    fn response_headers(&self, _ctx: &RequestContext, _headers: &mut http::HeaderMap) {}

    /// Whether the pipeline should keep the backend's answer for `completed` (`ctx.answer`):
    /// costs nothing for JSON, and assembling a stream's chunks for a stream.
    fn wants_answer(&self, _ctx: &RequestContext) -> bool {
        false
    }

    async fn completed(&self, _ctx: &RequestContext) {}
}

/// What policies are built with, besides their own config.
pub struct PolicyDeps<'a> {
    /// Backends and pools by id.
    pub targets: &'a BTreeMap<String, Target>,
    pub subscriptions: &'a Arc<SubscriptionStore>,
    pub invalid_keys: &'a Option<Arc<crate::key_guessing::InvalidKeyLimiter>>,
    pub counters: &'a Arc<Counters>,
    pub cache: &'a CacheDeps,
    pub ledger: &'a Arc<Ledger>,
    pub max_body_bytes: usize,
    pub log: RequestLog,
    pub metrics: &'a Metrics,
    pub tasks: TaskTracker,
}

/// Ids that tell a policy's own reservation apart from another's in the request context.
static POLICY_IDS: AtomicUsize = AtomicUsize::new(0);

/// The registry: one line per policy.
fn build_policy(config: &PolicyConfig, deps: &PolicyDeps<'_>) -> Result<Box<dyn Policy>, String> {
    let id = POLICY_IDS.fetch_add(1, Ordering::Relaxed);
    Ok(match config {
        PolicyConfig::SetHeader(c) => Box::new(set_header::SetHeader::new(c)?),
        PolicyConfig::SetVariable(c) => Box::new(set_variable::SetVariable::new(c)?),
        PolicyConfig::TokenLimit(c) => Box::new(token_limit::TokenLimit::new(id, c, deps.counters.clone())?),
        PolicyConfig::RateLimitByKey(c) => {
            Box::new(call_limit::CallLimit::new(id, call_limit::CallLimitKind::Rate, c, deps.counters.clone())?)
        }
        PolicyConfig::QuotaByKey(c) => {
            Box::new(call_limit::CallLimit::new(id, call_limit::CallLimitKind::Quota, c, deps.counters.clone())?)
        }
        PolicyConfig::SemanticCacheLookup(c) => {
            let embedder = match c.switched_off {
                Some(reason) => Err(reason),
                None => Ok(deps.cache.embedder(&c.embeddings)?),
            };
            Box::new(semantic_cache::SemanticCacheLookup::new(c, embedder, deps.cache.store()?)?)
        }
        PolicyConfig::SemanticCacheStore(c) => {
            Box::new(semantic_cache::SemanticCacheStore::new(c, deps.cache.store()?))
        }
        PolicyConfig::EmitTokenMetric(c) => Box::new(
            emit_token_metric::EmitTokenMetric::new(c, &deps.metrics.meter(&c.namespace)).map_err(|e| e.to_string())?,
        ),
        PolicyConfig::SetBackendService(c) => Box::new(set_backend_service::SetBackendService {
            target: deps
                .targets
                .get(&c.backend_id)
                .cloned()
                .ok_or_else(|| format!("unknown backend or pool {:?}", c.backend_id))?,
        }),
    })
}
