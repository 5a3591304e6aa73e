//! The ledger of a single gateway without Redis: buckets in memory, made durable by a journal file.
//!
//! The journal is JSON lines, one bucket delta per line (`{"hour":..,"subscription":..,"team":..,
//! "model":..,"api":..,"requests":..,"prompt":..,...}`); a bucket's total is the sum of its lines.
//! A background task appends the deltas gathered since the last flush every second (write, then
//! fsync), so a crash loses at most the last second; a clean shutdown flushes the rest.
//!
//! On start the journal is replayed (a torn last line, from a crash mid-write, is ignored) and
//! compacted to one line per bucket (written to a temporary file, then renamed over the journal).
//! The process holds an exclusive lock on `<journal>.lock` for its lifetime, so a second gateway
//! on the same journal fails at start-up; the lock lives in a file of its own because compaction
//! replaces the journal file itself. Readers (`aigw chargeback`) take no lock: they see whole
//! flushed lines, and at worst a torn last line, which they ignore too.
//!
//! Request ids are deduplicated in memory over the most recent [`RECENT_IDS`] appends, which
//! covers retries of the same completion (they come right after it). The gateway's ids are
//! UUIDs, kept as 16 bytes.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::task::AbortOnDropHandle;

use super::{BucketKey, Buckets, Counts, LedgerError, LedgerStore, UsageRecord, WriteFailures, lock};

/// How many recent request ids are remembered for deduplication.
pub const RECENT_IDS: usize = 16_384;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One journal line.
#[derive(Serialize, Deserialize)]
struct Line {
    #[serde(flatten)]
    key: BucketKey,
    #[serde(flatten)]
    counts: Counts,
}

/// What a journal holds.
pub struct Replay {
    pub buckets: Buckets,
    /// Whether the last line was torn (cut off mid-write) and ignored.
    pub torn_last_line: bool,
}

/// Reads a journal; a missing file is an empty ledger. A line that does not parse is an error,
/// unless it is the last one and unterminated: a write a crash cut short.
pub fn read_journal(path: &Path) -> Result<Replay, LedgerError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Replay { buckets: Buckets::default(), torn_last_line: false });
        }
        Err(e) => return Err(LedgerError::Journal(format!("cannot read {}: {e}", path.display()))),
    };
    let terminated = text.last() == Some(&b'\n');
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let mut buckets = Buckets::default();
    let mut torn_last_line = false;
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(line) => buckets.add(&line.key, &line.counts),
            Err(_) if i + 1 == lines.len() && !terminated => torn_last_line = true,
            Err(e) => {
                return Err(LedgerError::Journal(format!(
                    "{} line {} is not a ledger record ({e}); repair or remove that line",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(Replay { buckets, torn_last_line })
}

/// Counts what goes wrong with the journal.
#[derive(Default)]
pub struct JournalStats {
    /// Flushes that could not write or fsync (the deltas are kept and retried).
    pub flush_failures: AtomicU64,
}

pub struct EmbeddedLedger {
    journal: Arc<Journal>,
    _flusher: AbortOnDropHandle<()>,
}

struct Journal {
    path: PathBuf,
    state: Mutex<State>,
    /// The journal, open for appending; held while a flush writes so flushes never interleave.
    file: Mutex<File>,
    /// Holds the exclusive lock for as long as this process uses the journal.
    _lock: File,
    stats: JournalStats,
    /// Whether the last flush failed, so a failing disk warns once, not every second.
    failing: AtomicBool,
}

#[derive(Default)]
struct State {
    totals: Buckets,
    /// Deltas not yet in the journal.
    pending: Buckets,
    seen: RecentIds,
}

#[derive(Default)]
struct RecentIds {
    set: HashSet<RequestId>,
    order: VecDeque<RequestId>,
}

/// A request id as remembered: the gateway's own are UUIDs.
#[derive(Clone, PartialEq, Eq, Hash)]
enum RequestId {
    Uuid(u128),
    Other(Arc<str>),
}

impl RequestId {
    fn of(id: &str) -> Self {
        uuid::Uuid::parse_str(id).map_or_else(|_| Self::Other(id.into()), |uuid| Self::Uuid(uuid.as_u128()))
    }
}

impl RecentIds {
    /// Remembers `id`; false if it was seen recently.
    fn insert(&mut self, id: &str) -> bool {
        let id = RequestId::of(id);
        if self.set.contains(&id) {
            return false;
        }
        if self.order.len() >= RECENT_IDS
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
        true
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> LedgerError {
    LedgerError::Journal(format!("cannot {what} {}: {e}", path.display()))
}

impl EmbeddedLedger {
    /// Locks, replays and compacts the journal at `path` (creating it and its directories), and
    /// starts the flush task. Must be called within a Tokio runtime.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| LedgerError::Journal("the embedded ledger must be opened within a Tokio runtime".into()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_error("create the directory", dir, e))?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error("open", &lock_path, e))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LedgerError::Journal(format!(
                    "{} is in use by another aigw process (it holds {}); give each gateway its own \
                     [ledger] path, or configure [redis] to share one ledger",
                    path.display(),
                    lock_path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(io_error("lock", &lock_path, e)),
        }
        let replay = read_journal(path)?;
        if replay.torn_last_line {
            tracing::warn!(path = %path.display(), "usage ledger: ignored a torn last journal line (a write cut short by a crash)");
        }
        compact(path, &replay.buckets)?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| io_error("open", path, e))?;
        let journal = Arc::new(Journal {
            path: path.to_owned(),
            state: Mutex::new(State { totals: replay.buckets, ..State::default() }),
            file: Mutex::new(file),
            _lock: lock_file,
            stats: JournalStats::default(),
            failing: AtomicBool::new(false),
        });
        let flusher = runtime.spawn(flush_every_second(Arc::downgrade(&journal)));
        Ok(Self { journal, _flusher: AbortOnDropHandle::new(flusher) })
    }

    pub fn stats(&self) -> &JournalStats {
        &self.journal.stats
    }
}

/// Rewrites the journal as one line per bucket: a temporary file, fsynced, renamed over it.
fn compact(path: &Path, buckets: &Buckets) -> Result<(), LedgerError> {
    let temp = PathBuf::from(format!("{}.compact", path.display()));
    let mut out = Vec::new();
    for (key, counts) in buckets.iter() {
        write_line(&mut out, key, counts);
    }
    let written = File::create(&temp).and_then(|mut file| {
        file.write_all(&out)?;
        file.sync_all()
    });
    written.map_err(|e| io_error("write", &temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| io_error("replace", path, e))?;
    // The rename is durable once the directory is.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn write_line(out: &mut Vec<u8>, key: &BucketKey, counts: &Counts) {
    #[derive(Serialize)]
    struct LineRef<'a> {
        #[serde(flatten)]
        key: &'a BucketKey,
        #[serde(flatten)]
        counts: &'a Counts,
    }
    if serde_json::to_writer(&mut *out, &LineRef { key, counts }).is_ok() {
        out.push(b'\n');
    }
}

async fn flush_every_second(journal: Weak<Journal>) {
    let mut ticks = tokio::time::interval(FLUSH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // Weak, so dropping the store releases the journal and its lock at once.
        let Some(journal) = journal.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || journal.flush()).await;
    }
}

impl Journal {
    /// Appends the pending deltas and fsyncs. On failure nothing of this batch stays in the
    /// file (it is cut back) and the deltas are kept for the next flush.
    fn flush(&self) -> Result<(), LedgerError> {
        let mut file = lock(&self.file);
        let pending = std::mem::take(&mut lock(&self.state).pending);
        if pending.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for (key, counts) in pending.iter() {
            write_line(&mut out, key, counts);
        }
        let written = file.metadata().map(|m| m.len()).and_then(|before| {
            file.write_all(&out).and_then(|()| file.sync_data()).inspect_err(|_| {
                let _ = file.set_len(before);
            })
        });
        match written {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.path.display(), "usage ledger: journal writable again");
                }
                Ok(())
            }
            Err(e) => {
                lock(&self.state).pending.merge(pending);
                self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), error = %e, "usage ledger: cannot write the journal; usage is kept in memory and retried every second");
                }
                Err(io_error("write", &self.path, e))
            }
        }
    }
}

impl Drop for Journal {
    /// Dropping the store (a clean stop) writes out what is pending.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[async_trait]
impl LedgerStore for EmbeddedLedger {
    fn write_failures(&self) -> WriteFailures {
        WriteFailures { failed: self.journal.stats.flush_failures.load(Ordering::Relaxed), dropped: 0 }
    }

    async fn append(&self, record: UsageRecord) {
        let mut state = lock(&self.journal.state);
        if !state.seen.insert(&record.request_id) {
            return;
        }
        state.totals.add(&record.key, &record.counts);
        state.pending.add(&record.key, &record.counts);
    }

    async fn query(&self, from: u64, to: u64) -> Result<Vec<(BucketKey, Counts)>, LedgerError> {
        Ok(lock(&self.journal.state).totals.range(from, to))
    }

    async fn flush(&self) -> Result<(), LedgerError> {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || journal.flush())
            .await
            .map_err(|e| LedgerError::Unavailable(format!("the journal flush did not finish: {e}")))?
    }
}
