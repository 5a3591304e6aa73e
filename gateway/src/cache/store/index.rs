//! The vectors of the cached entries, per partition, searched in this process: one matrix-vector
//! product per lookup, with no network and no allocation per entry.
//!
//! A partition keeps its vectors in one flat row-major `Vec<f32>` (the dimension is fixed by its
//! first entry), with the id, prompt, expiry and payload of each row beside it. Removal is a
//! swap-remove: the last row moves into the hole, so the matrix stays dense. The bound per
//! partition and the eviction rule are the ones documented in [`super`]: on insert, expired rows
//! go first, then the rows that expire soonest (ties: the oldest insert).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ndarray::{ArrayView1, ArrayView2};

use super::{CacheError, CacheLimits, Candidate, EntryId};

/// `P`: what each row carries besides its vector (the answer in memory; nothing with Redis).
pub struct Index<P> {
    partitions: HashMap<String, Partition<P>>,
    max_per_partition: usize,
    /// Rows of all partitions, expired ones included until pruned.
    len: usize,
    /// Insertion order, to evict the oldest of entries that expire in the same millisecond.
    inserted: u64,
    /// When an insert next prunes every partition, so partitions nobody writes to any more do not
    /// keep their expired rows (and, in memory, answers) for ever.
    next_sweep_ms: u64,
}

const SWEEP_EVERY_MS: u64 = 1_000;

/// An index shared by searches (readers) and inserts (writers), each holding it briefly.
pub struct SharedIndex<P>(RwLock<Index<P>>);

impl<P> SharedIndex<P> {
    pub fn new(limits: CacheLimits) -> Self {
        Self(RwLock::new(Index::new(limits)))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Index<P>> {
        // The index's operations are not expected to panic; if one did, serving lookups from what
        // it left beats failing every lookup after it.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Index<P>> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One entry to index.
pub struct IndexEntry<'a, P> {
    pub id: EntryId,
    pub vector: &'a [f32],
    pub prompt: Arc<str>,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: u64,
    pub payload: P,
}

struct Partition<P> {
    dim: usize,
    /// Row-major, `dim` floats per row, row `i` belonging to `rows[i]`.
    vectors: Vec<f32>,
    rows: Vec<Row<P>>,
    row_of: HashMap<EntryId, usize>,
}

struct Row<P> {
    id: EntryId,
    prompt: Arc<str>,
    expires_ms: u64,
    inserted: u64,
    payload: P,
}

fn dimension_error(expected: usize, got: usize) -> CacheError {
    CacheError::Vector(format!("{got} dimensions where the partition has {expected}"))
}

impl<P> Index<P> {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            partitions: HashMap::new(),
            max_per_partition: limits.max_entries_per_partition,
            len: 0,
            inserted: 0,
            next_sweep_ms: 0,
        }
    }

    /// Rows of every partition, expired ones included until [`Index::prune`] drops them.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, partition: &str, id: EntryId) -> bool {
        self.partitions.get(partition).is_some_and(|p| p.row_of.contains_key(&id))
    }

    /// Unexpired rows of `partition` scoring at least `min_score` against `query`, best first, at
    /// most `max`.
    pub fn search(
        &self,
        partition: &str,
        query: &[f32],
        min_score: f32,
        max: usize,
        now_ms: u64,
    ) -> Result<Vec<Candidate>, CacheError> {
        let Some(part) = self.partitions.get(partition) else { return Ok(Vec::new()) };
        if query.len() != part.dim {
            return Err(dimension_error(part.dim, query.len()));
        }
        let matrix = ArrayView2::from_shape((part.rows.len(), part.dim), &part.vectors)
            .map_err(|e| CacheError::Vector(e.to_string()))?;
        let scores = matrix.dot(&ArrayView1::from(query));
        let mut hits: Vec<(f32, usize)> = scores
            .iter()
            .enumerate()
            .filter(|&(row, &score)| score >= min_score && part.rows[row].expires_ms > now_ms)
            .map(|(row, &score)| (score, row))
            .collect();
        let best_first = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
        if hits.len() > max {
            if max == 0 {
                return Ok(Vec::new());
            }
            hits.select_nth_unstable_by(max - 1, best_first);
            hits.truncate(max);
        }
        hits.sort_unstable_by(best_first);
        Ok(hits
            .into_iter()
            .map(|(score, row)| Candidate { id: part.rows[row].id, score, prompt: part.rows[row].prompt.clone() })
            .collect())
    }

    /// Whether `vector` may go into `partition`: not empty, and of the partition's dimension.
    pub fn check(&self, partition: &str, vector: &[f32]) -> Result<(), CacheError> {
        match self.partitions.get(partition) {
            _ if vector.is_empty() => Err(CacheError::Vector("empty vector".to_owned())),
            Some(part) if part.dim != vector.len() => Err(dimension_error(part.dim, vector.len())),
            _ => Ok(()),
        }
    }

    /// The payload of an unexpired row.
    pub fn payload(&self, partition: &str, id: EntryId, now_ms: u64) -> Option<&P> {
        let part = self.partitions.get(partition)?;
        let row = &part.rows[*part.row_of.get(&id)?];
        (row.expires_ms > now_ms).then_some(&row.payload)
    }

    /// Adds a row (an id already indexed is left as it is), drops the partition's expired rows
    /// (every partition's, once a second), and evicts by the rule if the partition is still over
    /// its bound.
    pub fn insert(&mut self, partition: &str, entry: IndexEntry<'_, P>, now_ms: u64) -> Result<(), CacheError> {
        if now_ms >= self.next_sweep_ms {
            self.prune(now_ms);
            self.next_sweep_ms = now_ms.saturating_add(SWEEP_EVERY_MS);
        }
        if let Some(part) = self.partitions.get_mut(partition) {
            if part.row_of.contains_key(&entry.id) {
                return Ok(());
            }
            self.len -= part.prune(now_ms);
            // A partition whose rows all expired may start over with another dimension.
            if part.rows.is_empty() {
                self.partitions.remove(partition);
            }
        }
        self.check(partition, entry.vector)?;
        let part = self.partitions.entry(partition.to_owned()).or_insert_with(|| Partition {
            dim: entry.vector.len(),
            vectors: Vec::new(),
            rows: Vec::new(),
            row_of: HashMap::new(),
        });
        self.inserted += 1;
        part.row_of.insert(entry.id, part.rows.len());
        part.vectors.extend_from_slice(entry.vector);
        part.rows.push(Row {
            id: entry.id,
            prompt: entry.prompt,
            expires_ms: entry.expires_ms,
            inserted: self.inserted,
            payload: entry.payload,
        });
        self.len += 1;
        while part.rows.len() > self.max_per_partition {
            let soonest = part.rows.iter().enumerate().min_by_key(|(_, r)| (r.expires_ms, r.inserted)).map(|(i, _)| i);
            let Some(row) = soonest else { break };
            part.swap_remove(row);
            self.len -= 1;
        }
        if part.rows.is_empty() {
            self.partitions.remove(partition);
        }
        Ok(())
    }

    /// The insertion count so far: rows inserted from now on are newer than this mark.
    pub fn mark(&self) -> u64 {
        self.inserted
    }

    /// Copies in the rows `other` got after `mark` (those this index does not hold yet).
    pub fn adopt_newer(&mut self, other: &Index<P>, mark: u64, now_ms: u64)
    where
        P: Clone,
    {
        for (name, part) in &other.partitions {
            for (row, vector) in part.rows.iter().zip(part.vectors.chunks_exact(part.dim)) {
                if row.inserted <= mark {
                    continue;
                }
                let entry = IndexEntry {
                    id: row.id,
                    vector,
                    prompt: row.prompt.clone(),
                    expires_ms: row.expires_ms,
                    payload: row.payload.clone(),
                };
                // Checked when it went into `other`; a partition rebuilt with another dimension
                // meanwhile wins.
                let _ = self.insert(name, entry, now_ms);
            }
        }
    }

    /// Whether the row was there.
    pub fn remove(&mut self, partition: &str, id: EntryId) -> bool {
        let Some(part) = self.partitions.get_mut(partition) else { return false };
        let Some(&row) = part.row_of.get(&id) else { return false };
        part.swap_remove(row);
        self.len -= 1;
        if part.rows.is_empty() {
            self.partitions.remove(partition);
        }
        true
    }

    /// Drops the expired rows of every partition.
    pub fn prune(&mut self, now_ms: u64) {
        for part in self.partitions.values_mut() {
            self.len -= part.prune(now_ms);
        }
        self.partitions.retain(|_, part| !part.rows.is_empty());
    }
}

impl<P> Partition<P> {
    /// Drops the expired rows; returns how many.
    fn prune(&mut self, now_ms: u64) -> usize {
        let before = self.rows.len();
        let mut row = 0;
        while row < self.rows.len() {
            if self.rows[row].expires_ms <= now_ms {
                // The last row moved here: look at this position again.
                self.swap_remove(row);
            } else {
                row += 1;
            }
        }
        before - self.rows.len()
    }

    fn swap_remove(&mut self, row: usize) {
        let last = self.rows.len() - 1;
        if row != last {
            self.vectors.copy_within(last * self.dim..(last + 1) * self.dim, row * self.dim);
            self.row_of.insert(self.rows[last].id, row);
        }
        self.vectors.truncate(last * self.dim);
        let removed = self.rows.swap_remove(row);
        self.row_of.remove(&removed.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const NOW: u64 = 1_000_000;

    fn normalised(v: &[f32]) -> Vec<f32> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    /// Deterministic pseudo-random unit vectors.
    fn random_unit(seed: &mut u64, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        normalised(&v)
    }

    fn add(index: &mut Index<u32>, partition: &str, id: EntryId, vector: &[f32], expires_ms: u64) {
        let entry = IndexEntry { id, vector, prompt: format!("p{id}").into(), expires_ms, payload: id as u32 };
        index.insert(partition, entry, NOW).expect("insert");
    }

    fn ids(candidates: &[Candidate]) -> Vec<EntryId> {
        candidates.iter().map(|c| c.id).collect()
    }

    /// Every row's vector, payload and position agree after swap-removes from the middle and end.
    #[test]
    fn swap_remove_keeps_rows_and_vectors_together() {
        let mut index = Index::new(CacheLimits::default());
        for id in 0..6 {
            add(&mut index, "p", id, &[id as f32, 1.0], NOW + 1_000);
        }
        assert!(index.remove("p", 1));
        assert!(index.remove("p", 5));
        assert!(!index.remove("p", 5), "already gone");
        assert_eq!(index.len(), 4);
        for id in [0, 2, 3, 4] {
            // Each row's vector is still its own: querying with it scores itself highest.
            let query = normalised(&[id as f32, 1.0]);
            let part = &index.partitions["p"];
            let row = part.row_of[&id];
            assert_eq!(&part.vectors[row * 2..row * 2 + 2], &[id as f32, 1.0], "row of {id}");
            assert_eq!(index.payload("p", id, NOW), Some(&(id as u32)));
            assert!(!index.search("p", &query, -1.0, 10, NOW).expect("search").is_empty());
        }
        for id in [0, 2, 3, 4] {
            assert!(index.remove("p", id));
        }
        assert!(index.partitions.is_empty(), "an empty partition is dropped");
        assert!(index.is_empty());
    }

    #[test]
    fn best_first_above_the_threshold_at_most_max() {
        let mut index = Index::new(CacheLimits::default());
        let query = normalised(&[1.0, 0.0, 0.0]);
        add(&mut index, "p", 1, &normalised(&[1.0, 0.5, 0.0]), NOW + 1);
        add(&mut index, "p", 2, &query, NOW + 1);
        add(&mut index, "p", 3, &normalised(&[0.0, 1.0, 0.0]), NOW + 1);
        add(&mut index, "p", 4, &normalised(&[1.0, 0.2, 0.0]), NOW + 1);
        let all = index.search("p", &query, 0.5, 10, NOW).expect("search");
        assert_eq!(ids(&all), [2, 4, 1]);
        assert!((all[0].score - 1.0).abs() < 1e-6);
        assert_eq!(&*all[0].prompt, "p2");
        assert_eq!(ids(&index.search("p", &query, 0.5, 2, NOW).expect("search")), [2, 4]);
        assert!(index.search("p", &query, 0.5, 0, NOW).expect("search").is_empty());
        assert!(index.search("other", &query, 0.5, 10, NOW).expect("search").is_empty());
        // Expired rows never match, even before they are pruned.
        assert!(index.search("p", &query, 0.5, 10, NOW + 1).expect("search").is_empty());
        assert_eq!(index.payload("p", 2, NOW + 1), None);
    }

    #[test]
    fn vectors_of_another_dimension_are_refused() {
        let mut index = Index::new(CacheLimits::default());
        add(&mut index, "p", 1, &[1.0, 0.0], NOW + 10);
        let entry =
            IndexEntry { id: 2, vector: &[1.0, 0.0, 0.0], prompt: "x".into(), expires_ms: NOW + 10, payload: 2 };
        assert!(matches!(index.insert("p", entry, NOW), Err(CacheError::Vector(_))));
        assert!(matches!(index.search("p", &[1.0], 0.0, 1, NOW), Err(CacheError::Vector(_))));
        let empty = IndexEntry { id: 3, vector: &[], prompt: "x".into(), expires_ms: NOW + 10, payload: 3 };
        assert!(matches!(index.insert("q", empty, NOW), Err(CacheError::Vector(_))));
        // Another partition may have another dimension; this one may once its rows expired.
        add(&mut index, "q", 4, &[1.0, 0.0, 0.0], NOW + 10);
        let entry =
            IndexEntry { id: 5, vector: &[0.0, 0.0, 1.0], prompt: "x".into(), expires_ms: NOW + 20, payload: 5 };
        assert!(index.insert("p", entry, NOW + 10).is_ok());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn eviction_drops_expired_rows_then_the_soonest_to_expire_then_the_oldest() {
        let mut index = Index::new(CacheLimits { max_entries_per_partition: 3 });
        let v = [1.0, 0.0];
        add(&mut index, "p", 1, &v, NOW + 50);
        add(&mut index, "p", 2, &v, NOW + 10);
        add(&mut index, "p", 3, &v, NOW + 40);
        add(&mut index, "p", 4, &v, NOW + 20);
        assert!(!index.contains("p", 2), "the soonest to expire goes");
        add(&mut index, "p", 5, &v, NOW + 5);
        assert!(!index.contains("p", 5), "the new entry itself when it expires soonest");
        add(&mut index, "other", 6, &v, NOW + 1);
        assert_eq!(index.len(), 4, "the bound is per partition");
        let mut rows = ids(&index.search("p", &v, 0.0, 10, NOW).expect("search"));
        rows.sort_unstable();
        assert_eq!(rows, [1, 3, 4]);
        // Same expiry: the oldest goes.
        let mut index = Index::new(CacheLimits { max_entries_per_partition: 2 });
        for id in 1..=3 {
            add(&mut index, "p", id, &v, NOW + 100);
        }
        assert!(!index.contains("p", 1) && index.contains("p", 2) && index.contains("p", 3));
        // Expired rows go on any insert, even under the bound.
        let late = IndexEntry { id: 9, vector: &v, prompt: "x".into(), expires_ms: NOW + 500, payload: 9 };
        index.insert("p", late, NOW + 100).expect("insert");
        assert_eq!(index.len(), 1);
        assert!(index.contains("p", 9));
    }

    #[test]
    fn prune_drops_expired_rows_of_every_partition() {
        let mut index = Index::new(CacheLimits::default());
        add(&mut index, "a", 1, &[1.0], NOW + 10);
        add(&mut index, "a", 2, &[1.0], NOW + 30);
        add(&mut index, "b", 3, &[1.0], NOW + 10);
        index.prune(NOW + 9);
        assert_eq!(index.len(), 3);
        index.prune(NOW + 10);
        assert_eq!(index.len(), 1);
        assert!(index.contains("a", 2));
        assert!(!index.partitions.contains_key("b"));
    }

    #[test]
    fn adopting_takes_only_rows_newer_than_the_mark() {
        let mut old = Index::new(CacheLimits::default());
        add(&mut old, "p", 1, &[1.0, 0.0], NOW + 10);
        let mark = old.mark();
        add(&mut old, "p", 2, &[0.0, 1.0], NOW + 10);
        add(&mut old, "q", 3, &[1.0], NOW + 10);
        let mut fresh = Index::new(CacheLimits::default());
        add(&mut fresh, "p", 2, &[0.0, 1.0], NOW + 10);
        fresh.adopt_newer(&old, mark, NOW);
        assert!(!fresh.contains("p", 1), "older than the mark");
        assert_eq!(fresh.len(), 2);
        let found = fresh.search("q", &[1.0], 0.9, 1, NOW).expect("search");
        assert_eq!((found[0].id, fresh.payload("q", 3, NOW)), (3, Some(&3)));
    }

    /// The lookup cost with a full partition (10,000 entries of 384 dimensions, the size of
    /// all-MiniLM-L6-v2's vectors). Prints figures; run in release:
    /// `cargo test --release -p aigw --lib cache::store -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn search_latency_full_partition() {
        const ENTRIES: usize = 10_000;
        const DIM: usize = 384;
        const SEARCHES: usize = 2_000;
        let mut index = Index::new(CacheLimits { max_entries_per_partition: ENTRIES });
        let mut seed = 42;
        for id in 0..ENTRIES as u64 {
            add(&mut index, "p", id, &random_unit(&mut seed, DIM), NOW + 3_600_000);
        }
        let queries: Vec<Vec<f32>> = (0..SEARCHES).map(|_| random_unit(&mut seed, DIM)).collect();
        let mut found = 0;
        let mut micros: Vec<f64> = queries
            .iter()
            .map(|query| {
                let started = Instant::now();
                // A low threshold so the top-k selection is part of what is measured.
                found += index.search("p", query, 0.1, 5, NOW).expect("search").len();
                started.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        micros.sort_by(f64::total_cmp);
        let at = |q: f64| micros[((micros.len() as f64 * q) as usize).min(micros.len() - 1)];
        println!(
            "search over {ENTRIES} x {DIM}: p50 {:.0} us, p99 {:.0} us, max {:.0} us ({SEARCHES} searches, {found} candidates)",
            at(0.50),
            at(0.99),
            at(1.0)
        );
    }
}
