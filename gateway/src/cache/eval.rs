//! `aigw cache-eval`: runs the semantic cache's hit decision (embedding, threshold, guard) on
//! labelled prompt pairs and reports how often it serves a wrong answer and how often it serves
//! a right one, with and without the guard.
//!
//! Pairs are JSON lines `{"a": ..., "b": ..., "label": "same"|"different"}` with optional `kind`
//! and `split`; `a` plays the cached prompt and `b` the new query.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::guard::{HitRule, Miss};
use crate::config::{Config, EmbeddingsConfig, EnvLookup, PolicyConfig, SemanticCacheLookupConfig};
use crate::embed::EmbedError;

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
            let config = crate::quickstart::config("cache-eval", "http://127.0.0.1:8081")
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
    // The local model reads a batch of this many texts at once: big enough to amortise the call,
    // small enough that padding to the longest text stays cheap.
    const BATCH: usize = 32;
    match &lookup.embeddings {
        EmbeddingsConfig::Local { model_path } => {
            let model = crate::embed::LocalModel::shared(model_path.as_deref())?;
            let mut vectors = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(BATCH) {
                vectors.extend(model.embed_batch(chunk)?);
                progress(vectors.len(), texts.len());
            }
            Ok(vectors)
        }
        EmbeddingsConfig::Backend { .. } => {
            let _ = (config, env);
            Err(EvalError::Config { source: "embeddings".to_owned(), detail: "backend embeddings: not yet".to_owned() })
        }
    }
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
    let mut seen = std::collections::HashSet::new();
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
    /// Time of one guard decision, over every pair.
    pub guard_mean: Duration,
    pub guard_max: Duration,
    /// Pairs decided wrongly with the guard on: (pair index, score, why), for the human output.
    pub mistakes: Vec<(usize, f32, String)>,
}

/// Decides every pair with `rule` (guard on) and with the threshold alone.
pub fn evaluate(rule: HitRule, pairs: &[Pair], scores: &[f32]) -> Report {
    let plain = HitRule { verify: false, ..rule };
    let guarded = HitRule { verify: true, ..rule };
    let mut report = Report { threshold: rule.threshold, verify_hits: rule.verify, ..Report::default() };
    let mut guard_total = Duration::ZERO;
    // The guard's word lists are built on first use; that is start-up, not a decision.
    let _ = super::guard::verify("", "");
    for (index, (pair, &score)) in pairs.iter().zip(scores).enumerate() {
        let without = plain.accepts(score, &pair.b, &pair.a).is_ok();
        let started = Instant::now();
        let decision = guarded.accepts(score, &pair.b, &pair.a);
        let took = started.elapsed();
        guard_total += took;
        report.guard_max = report.guard_max.max(took);
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
    report.guard_mean = guard_total / u32::try_from(pairs.len().max(1)).unwrap_or(u32::MAX);
    report
}

impl Report {
    pub fn to_json(&self) -> Value {
        let mut value = self.overall.to_json();
        let object = value.as_object_mut().expect("Figures::to_json builds an object");
        object.insert("threshold".to_owned(), json!(round(f64::from(self.threshold))));
        object.insert("verify_hits".to_owned(), json!(self.verify_hits));
        let map = |figures: &BTreeMap<String, Figures>| -> Value {
            figures.iter().map(|(k, f)| (k.clone(), f.to_json())).collect::<serde_json::Map<_, _>>().into()
        };
        object.insert("kinds".to_owned(), map(&self.kinds));
        object.insert("splits".to_owned(), map(&self.splits));
        object.insert("refusals".to_owned(), json!(self.refusals));
        object.insert("guard_us".to_owned(), json!({ "mean": micros(self.guard_mean), "max": micros(self.guard_max) }));
        value
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
            "guard time per pair: mean {:.1} µs, max {:.1} µs",
            micros(self.guard_mean),
            micros(self.guard_max)
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
mod dump_scores {
    #[test]
    #[ignore]
    fn dump() {
        let path = std::env::var("PAIRS").expect("PAIRS");
        let pairs = super::read_pairs(std::path::Path::new(&path)).expect("pairs");
        let model = crate::embed::LocalModel::shared(None).expect("model");
        let texts = super::distinct_texts(&pairs);
        let vectors = model.embed_batch(&texts).expect("embed");
        let scores = super::pair_scores(&pairs, &texts, &vectors);
        let out: Vec<String> = scores.iter().map(|s| s.to_string()).collect();
        std::fs::write(std::env::var("OUT").expect("OUT"), out.join("\n")).expect("write");
    }
}
