//! Builds the gateway from its configuration: backends and pools, the stores (the one place that
//! chooses Redis or this process's memory for counters, the semantic cache and the ledger), and
//! each API's pipeline. `server` then serves it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::access_log::RequestLog;
use crate::cache::store::{CacheLimits, CacheStore};
use crate::cache::{self, CacheDeps};
use crate::client_ip::{Cidr, TrustedProxies};
use crate::config::{ApiKind, Config, ConfigError, EnvLookup, PolicyConfig};
use crate::infra::clock::{Clock, SystemClock};
use crate::ledger::Ledger;
use crate::limits::Counters;
use crate::limits::redis::RedisStore;
use crate::metrics::Metrics;
use crate::policy::{Pipeline, PolicyDeps};
use crate::server::Shared;
use crate::subscription::{KeyDigest, SubscriptionStore};
use crate::upstream::backend::Backend;
use crate::upstream::pool::{self, Target};

/// The gateway, built and ready to serve (see `server`).
pub struct Gateway {
    pub config: Config,
    pub backends: BTreeMap<String, Arc<Backend>>,
    /// Backends and pools by id, as APIs name them.
    pub(crate) targets: Arc<BTreeMap<String, Target>>,
    pub(crate) apis: Vec<(ApiKind, String, Arc<Pipeline>)>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) log: RequestLog,
    pub(crate) counters: Arc<Counters>,
    pub(crate) proxies: Arc<TrustedProxies>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) admin_key: Option<KeyDigest>,
    pub(crate) metrics: Metrics,
}

/// Where shared state lives, chosen once: in Redis when `[redis]` is configured (shared by
/// every instance), else in this process (memory, and the embedded journal for the ledger).
struct Stores {
    counters: Counters,
    /// Only when some API looks answers up.
    cache: Option<Arc<dyn CacheStore>>,
    ledger: Ledger,
}

impl Stores {
    fn open(config: &Config, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let cache_used = config
            .apis
            .values()
            .any(|api| api.inbound.iter().any(|p| matches!(p, PolicyConfig::SemanticCacheLookup(_))));
        let limits = CacheLimits { max_entries_per_partition: config.cache.max_entries_per_partition };
        let ledger = Ledger::open(config, env)?;
        let Some(redis) = &config.redis else {
            return Ok(Self {
                counters: Counters::in_memory(clock),
                cache: cache_used.then(|| cache::store::memory(limits)),
                ledger,
            });
        };
        let url = redis.url(env)?;
        let timeout = Duration::from_millis(redis.timeout_ms);
        let cooldown = Duration::from_millis(redis.breaker_cooldown_ms);
        let counter_store =
            RedisStore::new(&url, timeout, cooldown, None).map_err(|e| ConfigError::at("redis.url", e))?;
        let cache = if cache_used {
            Some(cache::store::redis(&url, timeout, cooldown, limits).map_err(|e| ConfigError::at("redis.url", e))?)
        } else {
            None
        };
        Ok(Self { counters: Counters::shared(Arc::new(counter_store), clock), cache, ledger })
    }
}

impl Gateway {
    pub fn build(config: Config, env: EnvLookup<'_>, metrics: Metrics) -> Result<Self, ConfigError> {
        let mut backends = BTreeMap::new();
        let mut tokens = crate::upstream::identity::TokenCaches::default();
        for (id, backend) in &config.backends {
            let built = Backend::from_config_sharing(id, backend, env, &mut tokens)
                .map_err(|e| ConfigError::at(format!("backends.{id}"), e))?;
            backends.insert(id.clone(), Arc::new(built));
        }
        let targets = Arc::new(pool::targets(&backends, &config.pools)?);
        let subscriptions = Arc::new(SubscriptionStore::from_config(&config.subscriptions, env));
        let log = if config.server.request_log { RequestLog::to_stdout() } else { RequestLog::disabled() };
        let shared = Arc::new(Shared { ready: AtomicBool::new(true), tasks: TaskTracker::new() });
        let stores = Stores::open(&config, env)?;
        let counters = Arc::new(stores.counters);
        let cache = CacheDeps::new(stores.cache, backends.clone());
        let ledger = Arc::new(stores.ledger);
        let admin_key = config.admin.as_ref().and_then(|a| KeyDigest::from_config(&a.key_sha256, &a.key_env, env));
        let invalid_keys =
            crate::key_guessing::InvalidKeyLimiter::from_config(&config.server.invalid_key_limit).map(Arc::new);
        let deps = PolicyDeps {
            targets: &targets,
            subscriptions: &subscriptions,
            invalid_keys: &invalid_keys,
            counters: &counters,
            cache: &cache,
            ledger: &ledger,
            max_body_bytes: config.server.max_body_bytes,
            log: log.clone(),
            metrics: &metrics,
            tasks: shared.tasks.clone(),
        };
        let mut apis = Vec::new();
        for (id, api) in &config.apis {
            let pipeline = Pipeline::build(id, api, &deps).map_err(|e| ConfigError::at(format!("apis.{id}"), e))?;
            apis.push((api.kind, api.path.clone(), Arc::new(pipeline)));
        }
        let blocks = config.server.trusted_proxies.iter().map(|b| Cidr::parse(b)).collect::<Result<Vec<_>, _>>();
        let proxies = Arc::new(TrustedProxies::new(blocks.map_err(|e| ConfigError::at("server.trusted-proxies", e))?));
        metrics.observe(&backends, ledger.clone());
        Ok(Self { config, backends, targets, apis, shared, log, counters, proxies, ledger, admin_key, metrics })
    }
}
