//! The chargeback query, shared by `GET /admin/chargeback` and `aigw chargeback`: its options
//! (validated with the same messages on both), the grouping of ledger buckets, pricing, and the
//! JSON, CSV and table renderings.
//!
//! Money is exact: a price in USD per million tokens becomes an integer number of pico-USD per
//! token (`round(price × 10^6)`, exact for prices with up to six decimals), costs are sums of
//! tokens × pico-USD in `u128`, and only the rendering rounds, to whole micro-USD (6 decimals).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::Offset;

use super::{BucketKey, Counts, floor_hour};
use crate::config::PriceConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Team,
    Subscription,
    Model,
    Day,
    Api,
}

impl GroupBy {
    const ALL: [GroupBy; 5] = [Self::Team, Self::Subscription, Self::Model, Self::Day, Self::Api];

    pub fn name(self) -> &'static str {
        match self {
            Self::Team => "team",
            Self::Subscription => "subscription",
            Self::Model => "model",
            Self::Day => "day",
            Self::Api => "api",
        }
    }

    /// The row a bucket belongs to; an empty value (no subscription, no model) shows as `-`.
    fn row_of(self, key: &BucketKey) -> String {
        let value = match self {
            Self::Team => key.team.clone(),
            Self::Subscription => key.subscription.clone(),
            Self::Model => key.model.clone(),
            Self::Api => key.api.clone(),
            Self::Day => day_of(key.hour),
        };
        if value.is_empty() { "-".to_owned() } else { value }
    }
}

fn day_of(hour: u64) -> String {
    let at =
        i64::try_from(hour).ok().and_then(|secs| Timestamp::from_second(secs).ok()).unwrap_or(Timestamp::UNIX_EPOCH);
    Offset::UTC.to_datetime(at).date().to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    /// Aligned columns, for the CLI.
    Table,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Csv => "csv",
            Self::Table => "table",
        }
    }
}

/// Who asks: the HTTP API (JSON by default, unknown parameters refused) or the CLI (a table by
/// default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    Http,
    Cli,
}

impl Asker {
    fn formats(self) -> &'static [Format] {
        match self {
            Self::Http => &[Format::Json, Format::Csv],
            Self::Cli => &[Format::Table, Format::Csv, Format::Json],
        }
    }
}

pub const PARAMS: [&str; 4] = ["from", "to", "group-by", "format"];

/// A bad option: which one, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryError {
    pub param: Cow<'static, str>,
    pub message: String,
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Inclusive; the hour it falls in counts whole.
    pub from: Timestamp,
    /// Exclusive.
    pub to: Timestamp,
    pub group_by: GroupBy,
    pub format: Format,
}

fn bad(param: &'static str, message: String) -> QueryError {
    QueryError { param: Cow::Borrowed(param), message }
}

fn allowed<T: Copy>(values: &[T], name: impl Fn(T) -> &'static str) -> String {
    values.iter().map(|v| name(*v)).collect::<Vec<_>>().join(", ")
}

/// `YYYY-MM-DD` (UTC midnight) or an RFC 3339 timestamp.
fn parse_instant(param: &'static str, value: &str) -> Result<Timestamp, QueryError> {
    let parsed = if value.len() == 10 {
        value.parse::<Date>().ok().and_then(|date| Offset::UTC.to_timestamp(date.to_datetime(Time::midnight())).ok())
    } else {
        value.parse::<Timestamp>().ok()
    };
    parsed.ok_or_else(|| {
        bad(
            param,
            format!(
                "{param} {value:?} is not a date: use YYYY-MM-DD (UTC midnight) or an RFC 3339 timestamp \
                 such as 2026-05-01T00:00:00Z or 2026-05-01T02:00:00+02:00"
            ),
        )
    })
}

impl Query {
    /// Validates the options; `now` supplies the defaults (from the first day of the current UTC
    /// month, to now).
    pub fn parse<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        asker: Asker,
        now: Timestamp,
    ) -> Result<Self, QueryError> {
        let mut given: BTreeMap<&'static str, &str> = BTreeMap::new();
        for (name, value) in params {
            let Some(known) = PARAMS.iter().find(|p| **p == name) else {
                return Err(QueryError {
                    param: Cow::Owned(name.to_owned()),
                    message: format!("unknown query parameter {name:?}; allowed: {}", PARAMS.join(", ")),
                });
            };
            if given.insert(known, value).is_some() {
                return Err(bad(known, format!("{known} is given more than once")));
            }
        }
        let from = match given.get("from") {
            Some(value) => parse_instant("from", value)?,
            None => {
                let today = Offset::UTC.to_datetime(now).date();
                Offset::UTC.to_timestamp(today.first_of_month().to_datetime(Time::midnight())).unwrap_or(now)
            }
        };
        let to = match given.get("to") {
            Some(value) => parse_instant("to", value)?,
            None => now,
        };
        if from >= to {
            return Err(bad("from", format!("from ({from}) must be before to ({to})")));
        }
        let group_by = match given.get("group-by") {
            Some(value) => GroupBy::ALL.into_iter().find(|g| g.name() == *value).ok_or_else(|| {
                bad(
                    "group-by",
                    format!("unknown group-by {value:?}; allowed: {}", allowed(&GroupBy::ALL, GroupBy::name)),
                )
            })?,
            None => GroupBy::Team,
        };
        let formats = asker.formats();
        let format = match given.get("format") {
            Some(value) => formats.iter().copied().find(|f| f.name() == *value).ok_or_else(|| {
                bad("format", format!("unknown format {value:?}; allowed: {}", allowed(formats, Format::name)))
            })?,
            None => formats[0],
        };
        Ok(Self { from, to, group_by, format })
    }

    /// The hour range to read: `[floor_hour(from), to)` in seconds since the epoch.
    pub fn hours(&self) -> (u64, u64) {
        let secs = |t: Timestamp| u64::try_from(t.as_second()).unwrap_or(0);
        // `to` is exclusive: a `to` inside an hour still includes that hour's bucket only if the
        // hour started before `to`, which `hour < to` in seconds already says.
        let to = secs(self.to) + u64::from(self.to.subsec_nanosecond() > 0);
        (floor_hour(secs(self.from)), to)
    }
}

/// A price in integer pico-USD per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Price {
    input: u128,
    output: u128,
    cached_input: u128,
}

/// The price table, per model.
#[derive(Debug, Clone, Default)]
pub struct Prices(BTreeMap<String, Price>);

/// USD per million tokens -> pico-USD per token (validation keeps prices finite, in
/// `[0, 1_000_000]`).
fn pico_per_token(usd_per_million: f64) -> u128 {
    (usd_per_million * 1e6).round() as u128
}

impl Prices {
    pub fn from_config(prices: &BTreeMap<String, PriceConfig>) -> Self {
        Self(
            prices
                .iter()
                .map(|(model, p)| {
                    let price = Price {
                        input: pico_per_token(p.input),
                        output: pico_per_token(p.output),
                        cached_input: pico_per_token(p.cached_input.unwrap_or(p.input)),
                    };
                    (model.clone(), price)
                })
                .collect(),
        )
    }

    /// (cost, saved cost) of a bucket in pico-USD; `None` when its model has no price.
    fn cost(&self, model: &str, counts: &Counts) -> Option<(u128, u128)> {
        let price = self.0.get(model)?;
        let cached = counts.cached.min(counts.prompt);
        let cost = u128::from(counts.prompt - cached) * price.input
            + u128::from(cached) * price.cached_input
            + u128::from(counts.completion) * price.output;
        let saved = u128::from(counts.saved_prompt) * price.input + u128::from(counts.saved_completion) * price.output;
        Some((cost, saved))
    }
}

/// Pico-USD as USD with 6 decimals (rounded half up to the micro-USD).
pub fn usd(pico: u128) -> String {
    let micro = (pico + 500_000) / 1_000_000;
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// One row (or the totals): summed counts and, when every bucket in it is priced, the costs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub counts: Counts,
    /// Pico-USD; `None` when some of its tokens are of a model without a price.
    pub cost: Option<u128>,
    pub saved_cost: Option<u128>,
}

impl Row {
    fn add(&mut self, counts: &Counts, cost: Option<(u128, u128)>, first: bool) {
        self.counts.add(counts);
        let (cost, saved) = match cost {
            Some((cost, saved)) => (Some(cost), Some(saved)),
            None => (None, None),
        };
        if first {
            (self.cost, self.saved_cost) = (cost, saved);
        } else {
            self.cost = self.cost.zip(cost).map(|(a, b)| a + b);
            self.saved_cost = self.saved_cost.zip(saved).map(|(a, b)| a + b);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub query: Query,
    /// By row key, sorted.
    pub rows: BTreeMap<String, Row>,
    pub totals: Row,
    /// Models with usage but no price: their rows' costs are left blank.
    pub unpriced_models: BTreeSet<String>,
}

impl Report {
    pub fn new(query: &Query, buckets: &[(BucketKey, Counts)], prices: &Prices) -> Self {
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        let mut totals = Row { cost: Some(0), saved_cost: Some(0), ..Row::default() };
        let mut unpriced_models = BTreeSet::new();
        for (key, counts) in buckets {
            let has_tokens = counts.prompt + counts.completion + counts.saved() > 0;
            let cost = match prices.cost(&key.model, counts) {
                Some(cost) => Some(cost),
                None if !has_tokens => Some((0, 0)),
                None => {
                    unpriced_models.insert(if key.model.is_empty() { "-".to_owned() } else { key.model.clone() });
                    None
                }
            };
            let row_key = query.group_by.row_of(key);
            let first = !rows.contains_key(&row_key);
            rows.entry(row_key).or_default().add(counts, cost, first);
            totals.add(counts, cost, false);
        }
        Self { query: query.clone(), rows, totals, unpriced_models }
    }

    /// The body and its content type, in the query's format.
    pub fn render(&self) -> (&'static str, String) {
        match self.query.format {
            Format::Json => ("application/json", self.to_json().to_string()),
            Format::Csv => ("text/csv; charset=utf-8", self.to_csv()),
            Format::Table => ("text/plain; charset=utf-8", self.to_table()),
        }
    }

    fn columns(row: &Row) -> [(&'static str, Option<String>); 8] {
        let c = &row.counts;
        [
            ("requests", Some(c.requests.to_string())),
            ("prompt_tokens", Some(c.prompt.to_string())),
            ("completion_tokens", Some(c.completion.to_string())),
            ("total_tokens", Some(c.total.to_string())),
            ("cached_tokens", Some(c.cached.to_string())),
            ("saved_tokens", Some(c.saved().to_string())),
            ("cost_usd", row.cost.map(usd)),
            ("saved_cost_usd", row.saved_cost.map(usd)),
        ]
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Map, Value};
        let object = |row: &Row, key: Option<&str>| {
            let mut object = Map::new();
            if let Some(key) = key {
                object.insert(self.query.group_by.name().to_owned(), Value::from(key));
            }
            for (name, value) in Self::columns(row) {
                let value = match (name, value) {
                    (_, None) => Value::Null,
                    // Money as strings, to stay exact.
                    ("cost_usd" | "saved_cost_usd", Some(text)) => Value::from(text),
                    (_, Some(number)) => number.parse::<u64>().map(Value::from).unwrap_or(Value::Null),
                };
                object.insert(name.to_owned(), value);
            }
            Value::Object(object)
        };
        serde_json::json!({
            "from": self.query.from.to_string(),
            "to": self.query.to.to_string(),
            "group_by": self.query.group_by.name(),
            "currency": "USD",
            "rows": self.rows.iter().map(|(key, row)| object(row, Some(key))).collect::<Vec<_>>(),
            "totals": object(&self.totals, None),
            "unpriced_models": self.unpriced_models.iter().collect::<Vec<_>>(),
        })
    }

    fn header(&self) -> Vec<&'static str> {
        let mut names = vec![self.query.group_by.name()];
        names.extend(Self::columns(&self.totals).map(|(name, _)| name));
        names
    }

    /// The rows then the totals, as cells (blank cost when unpriced).
    fn lines(&self) -> Vec<Vec<String>> {
        let cells = |key: &str, row: &Row| {
            let mut cells = vec![key.to_owned()];
            cells.extend(Self::columns(row).map(|(_, value)| value.unwrap_or_default()));
            cells
        };
        let mut lines: Vec<Vec<String>> = self.rows.iter().map(|(key, row)| cells(key, row)).collect();
        lines.push(cells("TOTAL", &self.totals));
        lines
    }

    pub fn to_csv(&self) -> String {
        let field = |cell: &str| {
            if cell.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", cell.replace('"', "\"\""))
            } else {
                cell.to_owned()
            }
        };
        let mut out = self.header().join(",");
        out.push('\n');
        for line in self.lines() {
            out.push_str(&line.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        out
    }

    pub fn to_table(&self) -> String {
        let header: Vec<String> = self.header().iter().map(|h| h.to_uppercase()).collect();
        let lines = self.lines();
        let widths: Vec<usize> = (0..header.len())
            .map(|i| lines.iter().map(|l| l[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
            .collect();
        let render = |cells: &[String]| {
            let mut line = String::new();
            for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                if i == 0 {
                    let _ = write!(line, "{cell:<width$}");
                } else {
                    let _ = write!(line, "  {cell:>width$}");
                }
            }
            line.trim_end().to_owned() + "\n"
        };
        let mut out = format!(
            "Chargeback from {} to {} (UTC, to exclusive), by {}, in USD\n\n",
            self.query.from,
            self.query.to,
            self.query.group_by.name()
        );
        out.push_str(&render(&header));
        let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
        for (i, line) in lines.iter().enumerate() {
            if i + 1 == lines.len() {
                out.push_str(&"-".repeat(rule));
                out.push('\n');
            }
            out.push_str(&render(line));
        }
        if !self.unpriced_models.is_empty() {
            let models: Vec<&str> = self.unpriced_models.iter().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "\nNo price for: {} (their rows' costs are blank; add [prices.\"<model>\"] to the config: prices \
                 apply to past usage too)",
                models.join(", ")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-05-17T10:30:00Z".parse().expect("timestamp")
    }

    fn parse(params: &[(&str, &str)]) -> Result<Query, QueryError> {
        Query::parse(params.iter().copied(), Asker::Http, now())
    }

    #[test]
    fn defaults_are_this_month_to_now_by_team() {
        let query = parse(&[]).expect("valid");
        assert_eq!(query.from.to_string(), "2026-05-01T00:00:00Z");
        assert_eq!(query.to, now());
        assert_eq!((query.group_by, query.format), (GroupBy::Team, Format::Json));
        let cli = Query::parse([], Asker::Cli, now()).expect("valid");
        assert_eq!(cli.format, Format::Table);
    }

    #[test]
    fn dates_and_timestamps() {
        let query = parse(&[("from", "2026-04-01"), ("to", "2026-04-02T02:00:00+02:00")]).expect("valid");
        assert_eq!(query.from.to_string(), "2026-04-01T00:00:00Z");
        assert_eq!(query.to.to_string(), "2026-04-02T00:00:00Z");
        // from inside an hour counts that hour whole.
        let query = parse(&[("from", "2026-04-01T10:59:59Z"), ("to", "2026-04-01T12:00:00Z")]).expect("valid");
        let ten = u64::try_from("2026-04-01T10:00:00Z".parse::<Timestamp>().expect("ts").as_second()).expect("u64");
        assert_eq!(query.hours(), (ten, ten + 7200));
    }

    #[test]
    fn bad_options_name_the_parameter() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: [Case; 7] = [
            (&[("group-by", "org")], "group-by", "allowed: team, subscription, model, day, api"),
            (&[("from", "yesterday")], "from", "YYYY-MM-DD"),
            (&[("to", "2026-13-01")], "to", "RFC 3339"),
            (&[("from", "2026-05-02"), ("to", "2026-05-01")], "from", "must be before to"),
            (&[("from", "2026-05-01"), ("to", "2026-05-01")], "from", "must be before to"),
            (&[("format", "table")], "format", "allowed: json, csv"),
            (&[("team", "a")], "team", "unknown query parameter \"team\""),
        ];
        for (params, param, message) in cases {
            let error = parse(params).expect_err("should be refused");
            assert_eq!(error.param, param, "{params:?}");
            assert!(error.message.contains(message), "{params:?}: {}", error.message);
        }
        assert_eq!(parse(&[("to", "2026-05-02"), ("to", "2026-05-03")]).expect_err("twice").param, "to");
    }

    fn bucket(team: &str, model: &str, hour: u64, counts: Counts) -> (BucketKey, Counts) {
        let key = BucketKey { hour, subscription: "s".into(), team: team.into(), model: model.into(), api: "a".into() };
        (key, counts)
    }

    #[test]
    fn prices_are_exact_and_unpriced_models_blank_their_rows() {
        let mut config = BTreeMap::new();
        config.insert("gpt".to_owned(), PriceConfig { input: 2.50, output: 10.0, cached_input: Some(1.25) });
        config.insert("mini".to_owned(), PriceConfig { input: 0.15, output: 0.60, cached_input: None });
        let prices = Prices::from_config(&config);
        let tokens = |prompt, completion, cached| Counts {
            requests: 1,
            prompt,
            completion,
            total: prompt + completion,
            cached,
            ..Counts::default()
        };
        let buckets = vec![
            // 900 × 2.50 + 100 × 1.25 + 500 × 10.00 per million = 0.007375 USD
            bucket("a", "gpt", 0, tokens(1000, 500, 100)),
            // 7 × 0.15 + 3 × 0.60 per million = 0.00000285 USD: rounds to 0.000003
            bucket("a", "mini", 3600, tokens(7, 3, 0)),
            bucket("b", "unknown", 0, tokens(10, 10, 0)),
            bucket(
                "b",
                "gpt",
                0,
                Counts { requests: 1, saved_prompt: 1000, saved_completion: 100, ..Counts::default() },
            ),
        ];
        let query = parse(&[("from", "1970-01-01"), ("to", "1970-01-02")]).expect("valid");
        let report = Report::new(&query, &buckets, &prices);
        let a = &report.rows["a"];
        assert_eq!(a.cost, Some(7_375_000_000 + 2_850_000));
        assert_eq!(a.cost.map(usd).as_deref(), Some("0.007378"));
        assert_eq!(a.counts.requests, 2);
        let b = &report.rows["b"];
        assert_eq!((b.cost, b.saved_cost), (None, None));
        assert_eq!(b.counts.saved(), 1100);
        assert_eq!(report.totals.cost, None);
        assert_eq!(report.unpriced_models.iter().collect::<Vec<_>>(), ["unknown"]);

        let json = report.to_json();
        assert_eq!(json["rows"][0]["team"], "a");
        assert_eq!(json["rows"][0]["cost_usd"], "0.007378");
        assert_eq!(json["rows"][1]["cost_usd"], serde_json::Value::Null);
        assert_eq!(json["totals"]["prompt_tokens"], 1017);
        assert_eq!(json["totals"]["saved_tokens"], 1100);
        assert_eq!(json["unpriced_models"][0], "unknown");

        let csv = report.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "team,requests,prompt_tokens,completion_tokens,total_tokens,cached_tokens,saved_tokens,cost_usd,saved_cost_usd"
        );
        assert_eq!(lines[1], "a,2,1007,503,1510,100,0,0.007378,0.000000");
        assert_eq!(lines[3], "TOTAL,4,1017,513,1530,100,1100,,");

        let by_day = parse(&[("from", "1970-01-01"), ("to", "1970-01-02"), ("group-by", "day")]).expect("valid");
        let table = Report::new(&by_day, &buckets[..2], &prices).to_table();
        assert!(table.contains("1970-01-01"), "{table}");
        assert!(
            table
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("TOTAL") && l.contains(" 0.007378 ") && l.ends_with(" 0.000000")),
            "{table}"
        );
    }

    #[test]
    fn usd_rounds_half_up_to_the_micro_dollar() {
        assert_eq!(usd(0), "0.000000");
        assert_eq!(usd(499_999), "0.000000");
        assert_eq!(usd(500_000), "0.000001");
        assert_eq!(usd(1_234_567_890_123_456), "1234.567890");
        assert_eq!(pico_per_token(0.15), 150_000);
        assert_eq!(pico_per_token(2.5), 2_500_000);
    }
}
