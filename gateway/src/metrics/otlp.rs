//! The OTLP exporter, configured by the standard environment variables.
//!
//! Exporting is on when `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set (unless `OTEL_METRICS_EXPORTER` leaves `otlp` out, e.g. `none`), or when
//! `OTEL_METRICS_EXPORTER` names `otlp` (then the default endpoint applies). The variables are
//! checked here, so a bad value stops start-up with the variable's name instead of being ignored;
//! the exporter crate then reads them itself (ENDPOINT, headers, timeout, compression, insecure,
//! temporality preference; the signal-specific `OTEL_EXPORTER_OTLP_METRICS_*` form wins over
//! `OTEL_EXPORTER_OTLP_*`). Header values are never echoed: they often hold credentials.

use std::time::Duration;

use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig};
use opentelemetry_sdk::metrics::PeriodicReader;

use super::MetricsError;
use crate::config::EnvLookup;

const SIGNAL_PREFIX: &str = "OTEL_EXPORTER_OTLP_METRICS_";
const GENERIC_PREFIX: &str = "OTEL_EXPORTER_OTLP_";

/// A setting's value and the variable it came from: the metrics-specific one, else the generic one.
fn setting(env: EnvLookup<'_>, name: &str) -> Option<(String, String)> {
    [SIGNAL_PREFIX, GENERIC_PREFIX].iter().find_map(|prefix| {
        let variable = format!("{prefix}{name}");
        env(&variable).filter(|v| !v.trim().is_empty()).map(|value| (variable, value))
    })
}

/// The periodic OTLP reader, when the environment asks for one.
pub(super) fn periodic_reader(env: EnvLookup<'_>) -> Result<Option<PeriodicReader<MetricExporter>>, MetricsError> {
    let endpoint = setting(env, "ENDPOINT");
    let wanted = match requested_exporters(env)? {
        Some(exporters) => exporters.otlp,
        None => endpoint.is_some(),
    };
    if !wanted {
        return Ok(None);
    }
    if let Some((variable, value)) = &endpoint {
        check_endpoint(variable, value)?;
    }
    let protocol = protocol(env)?;
    if let Some((variable, value)) = setting(env, "TIMEOUT") {
        millis(&variable, &value)?;
    }
    if let Some((variable, value)) = setting(env, "HEADERS") {
        check_headers(&variable, &value)?;
    }
    let temporality = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";
    if let Some(value) = env(temporality).filter(|v| !v.is_empty())
        && !["cumulative", "delta", "lowmemory"].contains(&value.to_ascii_lowercase().as_str())
    {
        return Err(MetricsError::at(temporality, format!("{value:?} is not cumulative, delta or lowmemory")));
    }
    let interval_variable = "OTEL_METRIC_EXPORT_INTERVAL";
    let interval =
        env(interval_variable).filter(|v| !v.is_empty()).map(|v| millis(interval_variable, &v)).transpose()?;
    if interval.is_some_and(|i| i.is_zero()) {
        return Err(MetricsError::at(interval_variable, "must be greater than 0 (milliseconds)"));
    }

    let built = match protocol {
        Protocol::Grpc => MetricExporter::builder().with_tonic().build(),
        _ => MetricExporter::builder().with_http().with_protocol(Protocol::HttpBinary).build(),
    };
    let exporter =
        built.map_err(|e| MetricsError::at("OTEL_EXPORTER_OTLP_*", format!("cannot build the exporter: {e}")))?;
    let mut reader = PeriodicReader::builder(exporter);
    if let Some(interval) = interval {
        reader = reader.with_interval(interval);
    }
    Ok(Some(reader.build()))
}

struct Exporters {
    otlp: bool,
}

/// `OTEL_METRICS_EXPORTER`: a comma-separated list, or unset.
fn requested_exporters(env: EnvLookup<'_>) -> Result<Option<Exporters>, MetricsError> {
    let variable = "OTEL_METRICS_EXPORTER";
    let Some(value) = env(variable).filter(|v| !v.trim().is_empty()) else { return Ok(None) };
    let mut exporters = Exporters { otlp: false };
    for name in value.split(',').map(|n| n.trim().to_ascii_lowercase()) {
        match name.as_str() {
            "otlp" => exporters.otlp = true,
            // `/metrics` always serves Prometheus text; nothing to start for it.
            "none" | "prometheus" => {}
            _ => {
                return Err(MetricsError::at(
                    variable,
                    format!("unknown exporter {name:?} (supported: otlp, prometheus, none)"),
                ));
            }
        }
    }
    Ok(Some(exporters))
}

/// `OTEL_EXPORTER_OTLP_(METRICS_)PROTOCOL`; the specification's default is `http/protobuf`.
fn protocol(env: EnvLookup<'_>) -> Result<Protocol, MetricsError> {
    let Some((variable, value)) = setting(env, "PROTOCOL") else { return Ok(Protocol::HttpBinary) };
    match value.trim() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Err(MetricsError::at(variable, "http/json is not built in: use http/protobuf or grpc")),
        other => Err(MetricsError::at(variable, format!("{other:?} is not grpc or http/protobuf"))),
    }
}

fn check_endpoint(variable: &str, value: &str) -> Result<(), MetricsError> {
    let uri = value.trim().parse::<http::Uri>().ok();
    let scheme_ok = uri.as_ref().and_then(|u| u.scheme_str()).is_some_and(|s| s == "http" || s == "https");
    if scheme_ok && uri.as_ref().and_then(|u| u.authority()).is_some() {
        Ok(())
    } else {
        Err(MetricsError::at(variable, "not an http:// or https:// URL with a host"))
    }
}

fn millis(variable: &str, value: &str) -> Result<Duration, MetricsError> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| MetricsError::at(variable, format!("{value:?} is not a whole number of milliseconds")))
}

/// `key1=value1,key2=value2` with header names as keys. Only positions are reported, not values.
fn check_headers(variable: &str, value: &str) -> Result<(), MetricsError> {
    for (i, entry) in value.split(',').enumerate().filter(|(_, e)| !e.trim().is_empty()) {
        let key = entry.split_once('=').map(|(k, _)| k.trim());
        if !key.is_some_and(|k| !k.is_empty() && http::HeaderName::try_from(k).is_ok()) {
            return Err(MetricsError::at(
                variable,
                format!("entry {} is not key=value with a header name as key (format: key1=value1,key2=value2)", i + 1),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }

    fn error(vars: &'static [(&'static str, &'static str)]) -> String {
        match periodic_reader(&with(vars)) {
            Err(e) => e.to_string(),
            Ok(reader) => panic!("accepted {vars:?} (reader: {})", reader.is_some()),
        }
    }

    #[test]
    fn no_endpoint_no_exporter() {
        assert!(periodic_reader(&with(&[])).expect("valid").is_none());
        let off = &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("OTEL_METRICS_EXPORTER", "none")];
        assert!(periodic_reader(&with(off)).expect("valid").is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
        let cases: [(&'static [(&'static str, &'static str)], &str); 8] = [
            (&[("OTEL_METRICS_EXPORTER", "otlp,zipkin")], "OTEL_METRICS_EXPORTER: unknown exporter \"zipkin\""),
            (&[(ENDPOINT, "localhost:4318")], "OTEL_EXPORTER_OTLP_ENDPOINT: not an http"),
            (&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "ftp://x")], "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: not an"),
            (&[(ENDPOINT, "http://c:4318"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")], "OTEL_EXPORTER_OTLP_PROTOCOL:"),
            (
                &[(ENDPOINT, "http://c:4318"), ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: http/json is not built in",
            ),
            (&[(ENDPOINT, "http://c:4318"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")], "OTEL_EXPORTER_OTLP_TIMEOUT:"),
            (&[(ENDPOINT, "http://c:4318"), ("OTEL_METRIC_EXPORT_INTERVAL", "0")], "OTEL_METRIC_EXPORT_INTERVAL:"),
            (
                &[(ENDPOINT, "http://c:4318"), ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,secret-token")],
                "OTEL_EXPORTER_OTLP_HEADERS: entry 2 is not key=value",
            ),
        ];
        for (vars, expected) in cases {
            let message = error(vars);
            assert!(message.starts_with(expected), "{vars:?}: {message}");
            assert!(!message.contains("secret-token"), "header values are never echoed: {message}");
        }
    }
}
