//! `aigw cache-eval`: runs the semantic cache's hit decision (embedding, threshold, guard) on
//! labelled prompt pairs and reports how often it serves a wrong answer and how often it serves
//! a right one, with and without the guard.
//!
//! Pairs are JSON lines `{"a": ..., "b": ..., "label": "same"|"different"}` with optional `kind`
//! and `split`; `a` plays the cached prompt and `b` the new query.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::guard::{HitRule, Miss};
use crate::config::{Config, EmbeddingsConfig, EnvLookup, PolicyConfig, SemanticCacheLookupConfig};
use crate::embed::{BackendEmbedder, EmbedError, Embedder, LocalModel};
use crate::upstream::backend::Backend;

/// One labelled pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub a: String,
    pub b: String,
    /// The answer for `a` is right for `b`.
    pub same: bool,
    pub kind: Option<String>,
    pub split: Option<String>,
}

#[derive(Debug)]
pub enum EvalError {
    /// A file could not be read.
    Read {
        path: String,
        detail: String,
    },
    /// A line of the pairs file is not a pair; `line` counts from 1.
    BadLine {
        line: usize,
        detail: String,
    },
    /// The pairs file holds no pair.
    NoPairs,
    /// The configuration does not load.
    Config {
        source: String,
        detail: String,
    },
    /// The configuration has no semantic-cache-lookup policy to evaluate.
    NoLookupPolicy {
        source: String,
    },
    Embed(EmbedError),
}

impl EvalError {
    /// 2 for input the user can fix (file, line, configuration), 1 for a failure while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Embed(_) => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, detail } => write!(f, "cannot read {path}: {detail}"),
            Self::BadLine { line, detail } => write!(f, "line {line}: {detail}"),
            Self::NoPairs => {
                write!(f, "no pairs: expected JSON lines {{\"a\": ..., \"b\": ..., \"label\": \"same\"|\"different\"}}")
            }
            Self::Config { source, detail } => write!(f, "{source}: {detail}"),
            Self::NoLookupPolicy { source } => write!(
                f,
                "no semantic-cache-lookup policy in {source}: add one to an API's inbound, or name another file with --config"
            ),
            Self::Embed(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for EvalError {}

impl From<EmbedError> for EvalError {
    fn from(e: EmbedError) -> Self {
        Self::Embed(e)
    }
}

/// Reads the pairs, finds the lookup policy of `config` (default: the quickstart's), embeds every
/// prompt as that policy would, and decides every pair.
pub async fn run(
    pairs_path: &Path,
    config_path: Option<&Path>,
    env: EnvLookup<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Report, Vec<Pair>), EvalError> {
    let pairs = read_pairs(pairs_path)?;
    let (config, source) = match config_path {
        Some(path) => {
            let source = path.display().to_string();
            let config = Config::load(path, env)
                .map_err(|e| EvalError::Config { source: source.clone(), detail: e.to_string() })?;
            (config, source)
        }
        None => {
            let source = "the quickstart configuration (policies/quickstart.toml)".to_owned();
            // The simulator's address does not matter here: nothing is sent to it.
            let keys = crate::quickstart::Keys { demo: "cache-eval".to_owned(), admin: "cache-eval-admin".to_owned() };
            let config = crate::quickstart::config(&keys)
                .map_err(|e| EvalError::Config { source: source.clone(), detail: e.to_string() })?;
            (config, source)
        }
    };
    let lookup = lookup_policy(&config, &source)?;
    let texts = distinct_texts(&pairs);
    let vectors = embed_all(&config, lookup, &texts, env, progress).await?;
    let scores = pair_scores(&pairs, &texts, &vectors);
    Ok((evaluate(HitRule::from_config(lookup), &pairs, &scores), pairs))
}

/// Reads JSON lines of pairs; blank lines are skipped, fields other than a, b, label, kind and
/// split are ignored.
pub fn parse_pairs(text: &str) -> Result<Vec<Pair>, EvalError> {
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let bad = |detail: String| EvalError::BadLine { line: index + 1, detail };
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let Value::Object(fields) = value else { return Err(bad("expected a JSON object".to_owned())) };
        let text_field = |name: &str| match fields.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(format!("\"{name}\" must be a string"))),
            None => Err(bad(format!("missing \"{name}\""))),
        };
        let optional = |name: &str| match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("\"{name}\" must be a string"))),
        };
        let a = text_field("a")?;
        let b = text_field("b")?;
        let same = match text_field("label")?.as_str() {
            "same" => true,
            "different" => false,
            other => return Err(bad(format!("\"label\" must be \"same\" or \"different\", not {other:?}"))),
        };
        pairs.push(Pair { a, b, same, kind: optional("kind")?, split: optional("split")? });
    }
    if pairs.is_empty() {
        return Err(EvalError::NoPairs);
    }
    Ok(pairs)
}

pub fn read_pairs(path: &Path) -> Result<Vec<Pair>, EvalError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvalError::Read { path: path.display().to_string(), detail: e.to_string() })?;
    parse_pairs(&text)
}

/// The first semantic-cache-lookup policy of any API's inbound (APIs in name order). `source`
/// names the configuration in the error.
pub fn lookup_policy<'c>(config: &'c Config, source: &str) -> Result<&'c SemanticCacheLookupConfig, EvalError> {
    config
        .apis
        .values()
        .flat_map(|api| &api.inbound)
        .find_map(|policy| match policy {
            PolicyConfig::SemanticCacheLookup(lookup) => Some(lookup),
            _ => None,
        })
        .ok_or_else(|| EvalError::NoLookupPolicy { source: source.to_owned() })
}

/// The embeddings a lookup policy would compute, for every text at once.
pub async fn embed_all(
    config: &Config,
    lookup: &SemanticCacheLookupConfig,
    texts: &[&str],
    env: EnvLookup<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<f32>>, EvalError> {
    // The local model reads this many texts at once: enough to amortise a call, few enough that
    // padding every text to the batch's longest stays cheap.
    const BATCH: usize = 32;
    // Requests in flight to an embeddings backend.
    const CONCURRENCY: usize = 8;
    let mut vectors = Vec::with_capacity(texts.len());
    match &lookup.embeddings {
        EmbeddingsConfig::Local { model_path } => {
            let model = LocalModel::shared(model_path.as_deref())?;
            for chunk in texts.chunks(BATCH) {
                vectors.extend(model.embed_batch(chunk)?);
                progress(vectors.len(), texts.len());
            }
        }
        EmbeddingsConfig::Backend { backend_id, model } => {
            let bad_config = |detail: String| EvalError::Config { source: format!("backend {backend_id:?}"), detail };
            let backend_config =
                config.backends.get(backend_id).ok_or_else(|| bad_config("no such backend".to_owned()))?;
            let backend = Backend::from_config(backend_id, backend_config, env).map_err(bad_config)?;
            let embedder = BackendEmbedder::new(Arc::new(backend), model.clone());
            let mut answers = futures_util::stream::iter(texts).map(|text| embedder.embed(text)).buffered(CONCURRENCY);
            while let Some(vector) = answers.next().await {
                vectors.push(vector?);
                progress(vectors.len(), texts.len());
            }
        }
    }
    Ok(vectors)
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The similarity of each pair's prompts.
pub fn pair_scores(pairs: &[Pair], texts: &[&str], vectors: &[Vec<f32>]) -> Vec<f32> {
    let index: HashMap<&str, usize> = texts.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let vector = |text: &str| index.get(text).and_then(|&i| vectors.get(i));
    pairs
        .iter()
        .map(|p| match (vector(&p.a), vector(&p.b)) {
            (Some(a), Some(b)) => cosine(a, b),
            _ => f32::NAN,
        })
        .collect()
}

/// Every distinct prompt of the pairs, in first-seen order: the texts to embed.
pub fn distinct_texts(pairs: &[Pair]) -> Vec<&str> {
    let mut seen = HashSet::new();
    pairs.iter().flat_map(|p| [p.a.as_str(), p.b.as_str()]).filter(|t| seen.insert(*t)).collect()
}

/// Hits and misses of one decision rule over a set of pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub same: usize,
    pub different: usize,
    /// Hits on "same" pairs: right answers served from the cache.
    pub true_hits: usize,
    /// Hits on "different" pairs: wrong answers served from the cache.
    pub false_hits: usize,
}

impl Counts {
    fn add(&mut self, same: bool, hit: bool) {
        if same {
            self.same += 1;
            self.true_hits += usize::from(hit);
        } else {
            self.different += 1;
            self.false_hits += usize::from(hit);
        }
    }

    pub fn precision(&self) -> Option<f64> {
        ratio(self.true_hits, self.true_hits + self.false_hits)
    }

    pub fn recall(&self) -> Option<f64> {
        ratio(self.true_hits, self.same)
    }

    pub fn false_hit_rate(&self) -> Option<f64> {
        ratio(self.false_hits, self.different)
    }

    fn to_json(self) -> Value {
        json!({
            "precision": self.precision(),
            "recall": self.recall(),
            "false_hit_rate": self.false_hit_rate(),
            "hits": self.true_hits + self.false_hits,
            "true_hits": self.true_hits,
            "false_hits": self.false_hits,
            "same": self.same,
            "different": self.different,
        })
    }
}

fn ratio(part: usize, whole: usize) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// The figures for a set of pairs: the threshold alone, and the threshold with the guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub without_guard: Counts,
    pub with_guard: Counts,
}

impl Figures {
    /// Of the "same" pairs cosine similarity alone serves, the share the guard still serves.
    pub fn retained(&self) -> Option<f64> {
        ratio(self.with_guard.true_hits, self.without_guard.true_hits)
    }

    fn to_json(self) -> Value {
        json!({
            "pairs": self.without_guard.same + self.without_guard.different,
            "with_guard": self.with_guard.to_json(),
            "without_guard": self.without_guard.to_json(),
            "retained": self.retained(),
        })
    }
}

/// What `aigw cache-eval` reports.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub threshold: f32,
    /// Whether the evaluated policy has the guard on (the figures show both either way).
    pub verify_hits: bool,
    pub overall: Figures,
    pub kinds: BTreeMap<String, Figures>,
    pub splits: BTreeMap<String, Figures>,
    /// Why the guard refused the pairs that cosine similarity alone would have served.
    pub refusals: BTreeMap<&'static str, usize>,
    /// Time of one guard decision over every pair: mean and 99th percentile.
    pub guard_mean: Duration,
    pub guard_p99: Duration,
    /// Pairs decided wrongly with the guard on: (pair index, score, why), for the human output.
    pub mistakes: Vec<(usize, f32, String)>,
}

/// Decides every pair with `rule` (guard on) and with the threshold alone.
pub fn evaluate(rule: HitRule, pairs: &[Pair], scores: &[f32]) -> Report {
    let plain = HitRule { verify: false, ..rule };
    let guarded = HitRule { verify: true, ..rule };
    let mut report = Report { threshold: rule.threshold, verify_hits: rule.verify, ..Report::default() };
    let mut guard_times = Vec::with_capacity(pairs.len());
    // The guard's word lists are built on first use; that is start-up, not a decision.
    let _ = super::guard::verify("", "");
    for (index, (pair, &score)) in pairs.iter().zip(scores).enumerate() {
        let without = plain.accepts(score, &pair.b, &pair.a).is_ok();
        let started = Instant::now();
        let decision = guarded.accepts(score, &pair.b, &pair.a);
        guard_times.push(started.elapsed());
        let with = decision.is_ok();
        let tally = |figures: &mut Figures| {
            figures.without_guard.add(pair.same, without);
            figures.with_guard.add(pair.same, with);
        };
        tally(&mut report.overall);
        if let Some(kind) = &pair.kind {
            tally(report.kinds.entry(kind.clone()).or_default());
        }
        if let Some(split) = &pair.split {
            tally(report.splits.entry(split.clone()).or_default());
        }
        if let Err(Miss::Refused(refusal)) = &decision {
            *report.refusals.entry(refusal.reason).or_default() += 1;
            if pair.same {
                report.mistakes.push((index, score, format!("refused ({refusal})")));
            }
        } else if with && !pair.same {
            report.mistakes.push((index, score, "served".to_owned()));
        }
    }
    guard_times.sort_unstable();
    let total: Duration = guard_times.iter().sum();
    report.guard_mean = total / u32::try_from(guard_times.len().max(1)).unwrap_or(u32::MAX);
    report.guard_p99 = guard_times.get(guard_times.len() * 99 / 100).copied().unwrap_or_default();
    report
}

impl Report {
    pub fn to_json(&self) -> Value {
        let map = |figures: &BTreeMap<String, Figures>| -> serde_json::Map<String, Value> {
            figures.iter().map(|(k, f)| (k.clone(), f.to_json())).collect()
        };
        let overall = &self.overall;
        json!({
            "threshold": round(f64::from(self.threshold)),
            "verify_hits": self.verify_hits,
            "pairs": overall.without_guard.same + overall.without_guard.different,
            "with_guard": overall.with_guard.to_json(),
            "without_guard": overall.without_guard.to_json(),
            "retained": overall.retained(),
            "kinds": map(&self.kinds),
            "splits": map(&self.splits),
            "refusals": self.refusals,
            "guard_us": { "mean": micros(self.guard_mean), "p99": micros(self.guard_p99) },
        })
    }

    /// A compact table: overall, per split, per kind.
    pub fn table(&self, pairs: &[Pair]) -> String {
        use std::fmt::Write as _;
        let overall = &self.overall;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} pairs ({} same, {} different), similarity threshold {}, guard {} in the policy",
            overall.without_guard.same + overall.without_guard.different,
            overall.without_guard.same,
            overall.without_guard.different,
            self.threshold,
            if self.verify_hits { "on" } else { "off" },
        );
        let _ = writeln!(
            out,
            "\n{:<26} {:>6} | {:>9} {:>7} {:>9} | {:>9} {:>7} {:>9} | {:>8}",
            "", "pairs", "precision", "recall", "false-hit", "precision", "recall", "false-hit", "retained"
        );
        let _ = writeln!(out, "{:<26} {:>6} | {:^27} | {:^27} |", "", "", "without guard", "with guard");
        let mut row = |name: &str, f: &Figures| {
            let (w, g) = (&f.without_guard, &f.with_guard);
            let _ = writeln!(
                out,
                "{:<26} {:>6} | {:>9} {:>7} {:>9} | {:>9} {:>7} {:>9} | {:>8}",
                name,
                w.same + w.different,
                percent(w.precision()),
                percent(w.recall()),
                percent(w.false_hit_rate()),
                percent(g.precision()),
                percent(g.recall()),
                percent(g.false_hit_rate()),
                percent(f.retained()),
            );
        };
        row("all", overall);
        for (split, figures) in &self.splits {
            row(&format!("split {split}"), figures);
        }
        for (kind, figures) in &self.kinds {
            row(&format!("  {kind}"), figures);
        }
        let refusals: Vec<String> = self.refusals.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(
            out,
            "\nguard refusals: {}",
            if refusals.is_empty() { "none".to_owned() } else { refusals.join(", ") }
        );
        let _ = writeln!(
            out,
            "guard time per pair: mean {:.1} µs, p99 {:.1} µs",
            micros(self.guard_mean),
            micros(self.guard_p99)
        );
        if !self.mistakes.is_empty() {
            let _ = writeln!(out, "\nwrong with the guard (score, label, decision):");
            for (index, score, what) in &self.mistakes {
                let pair = &pairs[*index];
                let label = if pair.same { "same" } else { "different" };
                let _ = writeln!(out, "  {score:.3} {label:<9} {what}: {:?} / {:?}", pair.a, pair.b);
            }
        }
        out
    }
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn micros(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1e6)
}

/// Four decimals: figures, not floating-point noise.
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: &str, b: &str, same: bool, kind: &str) -> Pair {
        Pair { a: a.to_owned(), b: b.to_owned(), same, kind: Some(kind.to_owned()), split: None }
    }

    #[test]
    fn pairs_parse_with_optional_fields_and_ignore_others() {
        let text = "{\"a\": \"x\", \"b\": \"y\", \"label\": \"same\", \"note\": 1}\n\n\
                    {\"a\": \"p\", \"b\": \"q\", \"label\": \"different\", \"kind\": \"k\", \"split\": \"holdout\"}\n";
        let pairs = parse_pairs(text).expect("valid pairs");
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0], Pair { a: "x".into(), b: "y".into(), same: true, kind: None, split: None });
        assert_eq!(pairs[1].kind.as_deref(), Some("k"));
        assert_eq!(pairs[1].split.as_deref(), Some("holdout"));
        let error = parse_pairs("{\"a\": \"x\", \"b\": \"y\", \"label\": \"same\"}\n[1]\n").expect_err("bad line 2");
        assert_eq!(error.to_string(), "line 2: expected a JSON object");
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn figures_count_hits_with_and_without_the_guard() {
        let pairs = [
            pair("How do I enable 2FA?", "How do I disable 2FA?", false, "antonym"),
            pair("how do i exit vim", "How do I exit vim?", true, "typo"),
            pair("Hi, how do I exit vim? Thanks!", "How do I exit vim?", true, "politeness"),
            pair("What is 2+2?", "Capital of France?", false, "unrelated"),
        ];
        let scores = [0.95, 0.97, 0.80, 0.10];
        let report = evaluate(HitRule { threshold: 0.85, verify: true }, &pairs, &scores);
        let (plain, guarded) = (report.overall.without_guard, report.overall.with_guard);
        assert_eq!((plain.true_hits, plain.false_hits, plain.same, plain.different), (1, 1, 2, 2));
        assert_eq!((guarded.true_hits, guarded.false_hits), (1, 0));
        assert_eq!(plain.precision(), Some(0.5));
        assert_eq!(guarded.precision(), Some(1.0));
        assert_eq!(plain.false_hit_rate(), Some(0.5));
        assert_eq!(guarded.false_hit_rate(), Some(0.0));
        assert_eq!(guarded.recall(), Some(0.5));
        assert_eq!(report.overall.retained(), Some(1.0));
        assert_eq!(report.refusals.get("antonym"), Some(&1));
        assert_eq!(report.kinds["antonym"].with_guard.recall(), None, "no same pairs of that kind");
        let json = report.to_json();
        assert_eq!(json["with_guard"]["false_hit_rate"], 0.0);
        assert_eq!(json["without_guard"]["precision"], 0.5);
        assert_eq!(json["kinds"]["typo"]["with_guard"]["recall"], 1.0);
        assert!(report.table(&pairs).contains("guard refusals: antonym 1"));
    }

    #[test]
    fn the_lookup_policy_is_found_or_named_missing() {
        let env = |_: &str| None;
        let config = Config::parse(
            "[backends.b]\nurl = \"http://127.0.0.1:9/v1\"\nkind = \"openai\"\n\
             [apis.a]\nkind = \"openai\"\nbackend = \"b\"\nsubscription-required = false\n\
             inbound = [{ policy = \"semantic-cache-lookup\", similarity-threshold = 0.9 }]\n",
            &env,
        )
        .expect("valid config");
        assert_eq!(lookup_policy(&config, "f.toml").expect("found").similarity_threshold, 0.9);
        let mut without = config.clone();
        without.apis.values_mut().for_each(|api| api.inbound.clear());
        let error = lookup_policy(&without, "f.toml").expect_err("none");
        assert!(error.to_string().starts_with("no semantic-cache-lookup policy in f.toml"), "{error}");
    }
}
