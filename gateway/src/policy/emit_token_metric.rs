//! `emit-token-metric`: API Management's llm-emit-token-metric. When a call completes (after the
//! last byte, also when the client left a stream), its token counts are recorded with the
//! configured dimensions as attributes, on a meter named after `namespace`:
//!
//! - backend usage: the OpenTelemetry GenAI histogram `gen_ai.client.token.usage` (split by
//!   `gen_ai.token.type` = input | output), and counters that sum directly:
//!   `aigw.llm.prompt_tokens`, `aigw.llm.completion_tokens`, `aigw.llm.total_tokens`,
//!   `aigw.llm.cached_tokens`;
//! - a semantic cache hit: `aigw.llm.saved_tokens`, the cached answer's total tokens (the backend
//!   was not called, so there is no usage).
//!
//! A dimension is a name and a template; these names need no value (API Management's spelling
//! in brackets): `subscription` ("Subscription ID"), `team`, `api` ("API ID"), `operation`
//! ("Operation ID"), `client-ip` ("Client IP address"), `model`, `backend` ("Backend ID"),
//! `cache` (hit, miss, bypass, error, none).

use async_trait::async_trait;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

use super::Policy;
use super::template::Template;
use crate::config::{ConfigError, EmitTokenMetricConfig};
use crate::context::{CacheStatus, RequestContext};
use crate::protocol::Operation;

/// API Management's limit.
const MAX_DIMENSIONS: usize = 10;

/// The GenAI semantic conventions' buckets for token counts.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

/// Label names the policy's own attributes, or Prometheus, already use.
const RESERVED_LABELS: [&str; 5] =
    ["le", "otel_scope_name", "gen_ai_token_type", "gen_ai_operation_name", "gen_ai_request_model"];

/// One attribute: its name and how its value is computed.
pub struct Dimension {
    name: String,
    value: Template,
}

impl Dimension {
    /// The dimensions of a policy, checked: at most 10, unique names (also as Prometheus labels),
    /// a value for every name without a default, no credential headers. Error paths are relative
    /// to the policy.
    pub fn parse_all(config: &EmitTokenMetricConfig) -> Result<Vec<Self>, ConfigError> {
        if config.namespace.trim().is_empty() {
            return Err(ConfigError::at("namespace", "must not be empty"));
        }
        if config.dimensions.len() > MAX_DIMENSIONS {
            return Err(ConfigError::at(
                "dimensions",
                format!("at most {MAX_DIMENSIONS} dimensions, found {}", config.dimensions.len()),
            ));
        }
        let mut labels = Vec::new();
        let mut dimensions = Vec::new();
        for (i, dimension) in config.dimensions.iter().enumerate() {
            let at = |field: &str| format!("dimensions[{i}].{field}");
            let name = dimension.name.trim();
            if name.is_empty() {
                return Err(ConfigError::at(at("name"), "must not be empty"));
            }
            let label = crate::metrics::prometheus::label_name(name);
            if label.starts_with("__") || RESERVED_LABELS.contains(&label.as_str()) {
                return Err(ConfigError::at(at("name"), format!("{name:?} is reserved")));
            }
            if labels.contains(&label) {
                return Err(ConfigError::at(
                    at("name"),
                    format!("{name:?} repeats another dimension (as a Prometheus label: {label})"),
                ));
            }
            labels.push(label);
            let text = match (&dimension.value, default_value(name)) {
                (Some(value), _) => value.as_str(),
                (None, Some(default)) => default,
                (None, None) => {
                    return Err(ConfigError::at(
                        at("value"),
                        format!(
                            "{name:?} has no default value: set one (e.g. \"{{request.header.x-user}}\") or use one of \
                             subscription, team, api, operation, client-ip, model, backend, cache"
                        ),
                    ));
                }
            };
            let value = Template::parse(text).map_err(|e| ConfigError::at(at("value"), e))?;
            if value.reads_credential_header() {
                return Err(ConfigError::at(at("value"), "must not copy a credential header into metrics"));
            }
            dimensions.push(Self { name: name.to_owned(), value });
        }
        Ok(dimensions)
    }
}

/// The template of a dimension named without a value.
fn default_value(name: &str) -> Option<&'static str> {
    Some(match name {
        "subscription" | "Subscription ID" => "{subscription.id}",
        "team" => "{subscription.team}",
        "api" | "API ID" => "{api.id}",
        "operation" | "Operation ID" => "{operation.id}",
        "client-ip" | "Client IP address" => "{client.ip}",
        "model" => "{model}",
        "backend" | "Backend ID" => "{backend.id}",
        "cache" => "{cache.status}",
        _ => return None,
    })
}

pub struct EmitTokenMetric {
    dimensions: Vec<Dimension>,
    usage: Histogram<u64>,
    prompt: Counter<u64>,
    completion: Counter<u64>,
    total: Counter<u64>,
    cached: Counter<u64>,
    saved: Counter<u64>,
}

impl EmitTokenMetric {
    /// `meter` is the one named after the config's namespace.
    pub fn new(config: &EmitTokenMetricConfig, meter: &Meter) -> Result<Self, ConfigError> {
        let counter = |name: &'static str, description: &'static str| {
            meter.u64_counter(name).with_unit("{token}").with_description(description).build()
        };
        Ok(Self {
            dimensions: Dimension::parse_all(config)?,
            usage: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Number of input and output tokens used, per backend call.")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            prompt: counter("aigw.llm.prompt_tokens", "Prompt (input) tokens the backend reported."),
            completion: counter("aigw.llm.completion_tokens", "Completion (output) tokens the backend reported."),
            total: counter("aigw.llm.total_tokens", "Total tokens the backend reported."),
            cached: counter("aigw.llm.cached_tokens", "Prompt tokens the backend served from its prompt cache."),
            saved: counter(
                "aigw.llm.saved_tokens",
                "Total tokens of answers served from the semantic cache (backend calls not made).",
            ),
        })
    }
}

#[async_trait]
impl Policy for EmitTokenMetric {
    fn reads_body(&self) -> bool {
        false
    }

    async fn completed(&self, ctx: &RequestContext) {
        let attributes: Vec<KeyValue> =
            self.dimensions.iter().map(|d| KeyValue::new(d.name.clone(), d.value.render(ctx))).collect();
        if let Some(usage) = &ctx.usage {
            self.prompt.add(usage.prompt_tokens, &attributes);
            self.completion.add(usage.completion_tokens, &attributes);
            self.total.add(usage.total_tokens, &attributes);
            self.cached.add(usage.cached_tokens, &attributes);
            let operation = match ctx.operation {
                Operation::Embeddings => "embeddings",
                _ => "chat",
            };
            let mut genai = attributes.clone();
            genai.push(KeyValue::new("gen_ai.operation.name", operation));
            genai.push(KeyValue::new("gen_ai.request.model", ctx.model().unwrap_or("").to_owned()));
            genai.push(KeyValue::new("gen_ai.token.type", "input"));
            self.usage.record(usage.prompt_tokens, &genai);
            if ctx.operation != Operation::Embeddings {
                genai.pop();
                genai.push(KeyValue::new("gen_ai.token.type", "output"));
                self.usage.record(usage.completion_tokens, &genai);
            }
        }
        let saved = ctx.cache.as_ref().filter(|c| c.status == CacheStatus::Hit).and_then(|c| c.saved);
        if let Some(saved) = saved {
            self.saved.add(saved.total_tokens, &attributes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricDimensionConfig;

    fn config(dimensions: &[(&str, Option<&str>)]) -> EmitTokenMetricConfig {
        EmitTokenMetricConfig {
            namespace: "aigw".to_owned(),
            dimensions: dimensions
                .iter()
                .map(|(name, value)| MetricDimensionConfig {
                    name: (*name).to_owned(),
                    value: value.map(str::to_owned),
                })
                .collect(),
        }
    }

    fn error(dimensions: &[(&str, Option<&str>)]) -> String {
        match Dimension::parse_all(&config(dimensions)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {dimensions:?}"),
        }
    }

    #[test]
    fn known_names_need_no_value() {
        let names = ["subscription", "team", "api", "operation", "client-ip", "model", "backend", "cache"];
        let mut dimensions: Vec<(&str, Option<&str>)> = names.iter().map(|n| (*n, None)).collect();
        dimensions.push(("user", Some("{request.header.x-user}")));
        dimensions.push(("client_ip", Some("{client.ip}")));
        assert!(error(&dimensions).starts_with("dimensions[9].name: \"client_ip\" repeats"), "{}", error(&dimensions));
        dimensions.pop();
        dimensions.push(("Backend ID", None));
        assert_eq!(Dimension::parse_all(&config(&dimensions)).expect("valid").len(), 10);
        dimensions.push(("API ID", None));
        assert!(error(&dimensions).starts_with("dimensions: at most 10 dimensions, found 11"));
    }

    #[test]
    fn bad_dimensions_name_their_field() {
        assert!(error(&[("user", None)]).starts_with("dimensions[0].value: \"user\" has no default value"));
        assert!(error(&[("team", None), ("team", None)]).starts_with("dimensions[1].name: \"team\" repeats"));
        assert!(error(&[("le", Some("x"))]).starts_with("dimensions[0].name: \"le\" is reserved"));
        assert!(error(&[("u", Some("{request.user}"))]).starts_with("dimensions[0].value: unknown placeholder"));
        assert!(error(&[("key", Some("{request.header.api-key}"))]).contains("credential header"));
        assert!(error(&[("", Some("x"))]).starts_with("dimensions[0].name: must not be empty"));
    }
}
