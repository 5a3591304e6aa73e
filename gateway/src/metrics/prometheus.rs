//! Prometheus text exposition format 0.0.4 of collected OpenTelemetry metrics, named as
//! OpenTelemetry's Prometheus compatibility rules name them: dots and other characters Prometheus
//! does not allow become `_` (`gen_ai.token.type` -> `gen_ai_token_type`), a unit with a
//! Prometheus word is appended (`s` -> `_seconds`; annotations such as `{token}` are dropped),
//! monotonic sums are counters ending in `_total`, and every sample carries its meter's name as
//! `otel_scope_name`. The resource's attributes go into `target_info`.
//!
//! Families are grouped by name across meters, so two policies with different namespaces give one
//! family with two `otel_scope_name` values; an instrument whose type clashes with an existing
//! family of the same name is left out (and logged) rather than making the page unparseable.

use std::collections::BTreeMap;
use std::fmt::Write;

use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

struct Family {
    kind: &'static str,
    help: String,
    samples: String,
}

/// A sample value as Prometheus writes it (integers exactly, floats with `+Inf`/`NaN`).
trait SampleValue: Copy {
    fn write_to(self, out: &mut String);
}

impl SampleValue for u64 {
    fn write_to(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for i64 {
    fn write_to(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for f64 {
    fn write_to(self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

pub fn render(collected: &ResourceMetrics) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for scope in collected.scope_metrics() {
        let scope_name = scope.scope().name();
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::U64(data) => add(&mut families, metric, scope_name, data),
                AggregatedMetrics::I64(data) => add(&mut families, metric, scope_name, data),
                AggregatedMetrics::F64(data) => add(&mut families, metric, scope_name, data),
            }
        }
    }
    let mut out = String::new();
    let resource: Vec<(String, String)> =
        collected.resource().iter().map(|(k, v)| (label_name(k.as_str()), v.as_str().into_owned())).collect();
    if !resource.is_empty() {
        out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\ntarget_info");
        write_labels(&mut out, &resource.into_iter().collect(), None);
        out.push_str(" 1\n");
    }
    for (name, family) in &families {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
        let _ = writeln!(out, "# TYPE {name} {}", family.kind);
        out.push_str(&family.samples);
    }
    out
}

fn add<T: SampleValue>(families: &mut BTreeMap<String, Family>, metric: &Metric, scope: &str, data: &MetricData<T>) {
    let kind = match data {
        MetricData::Sum(sum) if sum.is_monotonic() => "counter",
        MetricData::Sum(_) | MetricData::Gauge(_) => "gauge",
        MetricData::Histogram(_) => "histogram",
        // No view here turns a histogram exponential; Prometheus text cannot carry one anyway.
        MetricData::ExponentialHistogram(_) => return,
    };
    let name = family_name(metric.name(), metric.unit(), kind == "counter");
    let family = families.entry(name.clone()).or_insert_with(|| Family {
        kind,
        help: metric.description().to_owned(),
        samples: String::new(),
    });
    if family.kind != kind {
        tracing::warn!(metric = %metric.name(), scope, "left out of /metrics: a {} of the same name exists", family.kind);
        return;
    }
    let out = &mut family.samples;
    match data {
        MetricData::Sum(sum) => {
            for point in sum.data_points() {
                sample(out, &name, &labels(point.attributes(), scope), None, point.value());
            }
        }
        MetricData::Gauge(gauge) => {
            for point in gauge.data_points() {
                sample(out, &name, &labels(point.attributes(), scope), None, point.value());
            }
        }
        MetricData::Histogram(histogram) => {
            let bucket = format!("{name}_bucket");
            for point in histogram.data_points() {
                let labels = labels(point.attributes(), scope);
                let mut cumulative = 0u64;
                for (bound, count) in point.bounds().zip(point.bucket_counts()) {
                    cumulative += count;
                    let mut le = String::new();
                    bound.write_to(&mut le);
                    sample(out, &bucket, &labels, Some(&le), cumulative);
                }
                sample(out, &bucket, &labels, Some("+Inf"), point.count());
                sample(out, &format!("{name}_sum"), &labels, None, point.sum());
                sample(out, &format!("{name}_count"), &labels, None, point.count());
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn sample(out: &mut String, name: &str, labels: &BTreeMap<String, String>, le: Option<&str>, value: impl SampleValue) {
    out.push_str(name);
    write_labels(out, labels, le);
    out.push(' ');
    value.write_to(out);
    out.push('\n');
}

/// Attributes as labels, sorted; attributes whose names become the same label are joined with
/// `;` as the compatibility rules say.
fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, scope: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for kv in attributes {
        let value = kv.value.as_str();
        labels
            .entry(label_name(kv.key.as_str()))
            .and_modify(|v| {
                v.push(';');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    labels.insert("otel_scope_name".to_owned(), scope.to_owned());
    labels
}

fn write_labels(out: &mut String, labels: &BTreeMap<String, String>, le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (name, value) in labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The Prometheus label an attribute named `name` becomes.
pub fn label_name(name: &str) -> String {
    sanitize(name, false)
}

/// A metric or label name Prometheus accepts: other characters become `_` (runs of them one
/// `_`), and a leading digit gets a `_` in front. `:` is only allowed in metric names.
fn sanitize(name: &str, metric: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    for c in name.chars() {
        let allowed = c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':');
        let c = if allowed { c } else { '_' };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

fn family_name(name: &str, unit: &str, counter: bool) -> String {
    let mut out = sanitize(name, true);
    let unit = match unit {
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        _ => None,
    };
    if let Some(unit) = unit
        && !out.ends_with(&format!("_{unit}"))
    {
        out.push('_');
        out.push_str(unit);
    }
    if counter && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ScrapeReader;
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use opentelemetry_sdk::metrics::reader::MetricReader;

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize("gen_ai.token.type", false), "gen_ai_token_type");
        assert_eq!(sanitize("Client IP address", false), "Client_IP_address");
        assert_eq!(sanitize("a..b", false), "a_b");
        assert_eq!(sanitize("9lives", false), "_9lives");
        assert_eq!(family_name("aigw.llm.total_tokens", "{token}", true), "aigw_llm_total_tokens_total");
        assert_eq!(family_name("http.server.request.duration", "s", false), "http_server_request_duration_seconds");
        assert_eq!(family_name("requests_total", "", true), "requests_total");
    }

    #[test]
    fn renders_counters_histograms_and_escapes_values() {
        let reader = ScrapeReader::new();
        let provider = SdkMeterProvider::builder().with_reader(reader.clone()).build();
        let meter = provider.meter("ns");
        let counter = meter.u64_counter("aigw.llm.total_tokens").with_unit("{token}").with_description("a\nb").build();
        counter.add(7, &[KeyValue::new("team", "x\"y\\z")]);
        counter.add(3, &[KeyValue::new("team", "x\"y\\z")]);
        let histogram = meter.u64_histogram("gen_ai.client.token.usage").with_boundaries(vec![1.0, 4.0]).build();
        histogram.record(3, &[KeyValue::new("gen_ai.token.type", "input")]);
        histogram.record(9, &[KeyValue::new("gen_ai.token.type", "input")]);
        let mut collected = ResourceMetrics::default();
        reader.collect(&mut collected).expect("collect");
        let text = render(&collected);
        assert!(text.contains("# HELP aigw_llm_total_tokens_total a\\nb\n"), "{text}");
        assert!(text.contains("# TYPE aigw_llm_total_tokens_total counter\n"), "{text}");
        assert!(
            text.contains("aigw_llm_total_tokens_total{otel_scope_name=\"ns\",team=\"x\\\"y\\\\z\"} 10\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE gen_ai_client_token_usage histogram\n"), "{text}");
        let labels = "gen_ai_token_type=\"input\",otel_scope_name=\"ns\"";
        for line in [
            format!("gen_ai_client_token_usage_bucket{{{labels},le=\"1\"}} 0\n"),
            format!("gen_ai_client_token_usage_bucket{{{labels},le=\"4\"}} 1\n"),
            format!("gen_ai_client_token_usage_bucket{{{labels},le=\"+Inf\"}} 2\n"),
            format!("gen_ai_client_token_usage_sum{{{labels}}} 12\n"),
            format!("gen_ai_client_token_usage_count{{{labels}}} 2\n"),
        ] {
            assert!(text.contains(&line), "{line} in {text}");
        }
    }
}
