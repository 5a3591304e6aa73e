//! The vectors of the cached entries, per partition, searched in this process: no network and no
//! allocation per entry.
//!
//! A partition keeps its vectors in one flat row-major `Vec<f32>` (the dimension is fixed by its
//! first entry), with the id, prompt, expiry and payload of each row beside it, and a copy of each
//! vector quantised to one byte per dimension ([`Quantised`]). A search reads the quantised copy of
//! every row (a quarter of the bytes: memory bandwidth is what a full scan costs), which bounds each
//! row's exact score; only the rows whose bounds can still make the result get their exact f32
//! score (an ndarray dot product), so the result is the one scoring every row in f32 would give.
//!
//! Removal is a swap-remove: the last row moves into the hole, so the matrices stay dense. The
//! bound per partition and the eviction rule are the ones documented in [`super`]: on insert,
//! expired rows go first, then the rows that expire soonest (ties: the oldest insert).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ndarray::ArrayView1;

use super::{CacheError, CacheLimits, Candidate, EntryId};

/// Up to this many dimensions, the integer dot product of [`dot_codes`] (at most 255 * 128 per
/// dimension) fits an `i32`.
const MAX_DIMENSIONS: usize = 65_536;

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
    /// Row-major, `dim` floats per row, row `i` belonging to `rows[i]`: the vectors as inserted,
    /// which every score returned comes from.
    vectors: Vec<f32>,
    /// The same rows quantised, `dim` codes per row: [`Quantised::codes`] plus 128, so that they
    /// widen with zeros, which takes fewer instructions than widening signed bytes (SSE2 has no
    /// sign-extending load): the scan of 10,000 x 384 measured 200 instead of 350 us.
    codes: Vec<u8>,
    /// The scale and error of row `i`'s codes.
    scales: Vec<Scale>,
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

/// A vector `x` as integer codes `c` in -127..=127 with `x ≈ scale * c`, `scale = max|x_i| / 127`
/// (per-vector symmetric quantisation).
struct Quantised {
    codes: Vec<i8>,
    scale: Scale,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Scale {
    scale: f32,
    /// `‖x‖`.
    norm: f32,
    /// `‖x - scale * c‖`: how far the codes are from the vector, for the bound of
    /// [`QueryCodes::bounds`].
    error: f32,
}

impl Quantised {
    fn new(vector: &[f32]) -> Self {
        let scale = vector.iter().fold(0.0_f32, |max, x| max.max(x.abs())) / 127.0;
        let codes: Vec<i8> = vector
            .iter()
            // `as` saturates, and turns NaN into 0; the error below accounts for what it did.
            .map(|&x| if scale > 0.0 { (x / scale).round() as i8 } else { 0 })
            .collect();
        let error = vector.iter().zip(&codes).map(|(&x, &c)| (x - scale * f32::from(c)).powi(2)).sum::<f32>();
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        // Outside this range, f32 would underflow or overflow somewhere in a score or its bounds,
        // where the bounds' rounding allowance does not hold: an infinite error leaves such vectors
        // (never unit ones, nor ones with NaN or infinite components) to the exact score.
        let error = if (1e-15..=1e15).contains(&norm) { error.sqrt() } else { f32::INFINITY };
        Self { codes, scale: Scale { scale, norm, error } }
    }
}

/// A query ready to be compared with the codes of every row.
struct QueryCodes {
    codes: Vec<i16>,
    /// `128 * Σ codes`: what the row codes' offset of 128 adds to their dot product with `codes`.
    offset: i32,
    scale: f32,
    /// `‖q‖ + error`, `error + slack`: see [`QueryCodes::bounds`].
    norm_plus_error: f32,
    error_plus_slack: f32,
}

/// The range a row's exact score lies in.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    row: usize,
    lower: f32,
    upper: f32,
}

impl QueryCodes {
    fn new(query: &[f32]) -> Self {
        let Quantised { codes, scale } = Quantised::new(query);
        let slack = 3.0 * (query.len() + 8) as f32 * f32::EPSILON * scale.norm;
        Self {
            offset: 128 * codes.iter().map(|&c| i32::from(c)).sum::<i32>(),
            codes: codes.into_iter().map(i16::from).collect(),
            scale: scale.scale,
            norm_plus_error: scale.norm + scale.error,
            error_plus_slack: scale.error + slack,
        }
    }

    /// Bounds of the exact f32 score of the row with `codes` (offset by 128) and `row`, i.e. of
    /// `x·q` computed in f32, from the approximate score `A = x'·q'` where `x' = scale_x * c_x`
    /// and `q' = scale_q * c_q` (an integer dot product, two multiplications).
    ///
    /// With `x = x' + dx` and `q = q' + dq`: `x·q - A = dx·q + x·dq - dx·dq`, so by Cauchy-Schwarz
    /// `|x·q - A| <= ‖dx‖‖q‖ + ‖x‖‖dq‖ + ‖dx‖‖dq‖`, the norms of the errors being measured at
    /// quantisation ([`Scale::error`]), not assumed. For unit vectors of 384 dimensions the errors
    /// are ~0.0045, so the margin is ~0.009. On top, `3 (d + 8) ε ‖x‖‖q‖` covers f32 rounding: that
    /// of the exact score (at most `d u ‖x‖‖q‖`, `u = ε / 2`), that of `A` (3 roundings) and of
    /// the norms and errors (each within `(d + 2) u ‖x‖` of its value, as an error is at most
    /// its norm), with room left.
    fn bounds(&self, row: usize, codes: &[u8], scale: &Scale) -> Bounds {
        let approx = (dot_codes(codes, &self.codes) - self.offset) as f32 * scale.scale * self.scale;
        let margin = scale.error * self.norm_plus_error + scale.norm * self.error_plus_slack;
        if approx.is_finite() && margin.is_finite() {
            Bounds { row, lower: approx - margin, upper: approx + margin }
        } else {
            // Nothing known (see `Quantised::new`): scored exactly.
            Bounds { row, lower: f32::NEG_INFINITY, upper: f32::INFINITY }
        }
    }
}

/// `Σ codes[i] * query[i]`, written so that LLVM vectorises it with baseline x86-64 (SSE2,
/// `pmaddwd`) as well as with wider targets: 32 independent accumulators over fixed-size chunks.
fn dot_codes(codes: &[u8], query: &[i16]) -> i32 {
    const LANES: usize = 32;
    let mut sums = [0_i32; LANES];
    let (codes_chunks, query_chunks) = (codes.chunks_exact(LANES), query.chunks_exact(LANES));
    let tail: i32 = (codes_chunks.remainder().iter().zip(query_chunks.remainder()))
        .map(|(&c, &q)| i32::from(c) * i32::from(q))
        .sum();
    for (codes, query) in codes_chunks.zip(query_chunks) {
        for ((sum, &c), &q) in sums.iter_mut().zip(codes).zip(query) {
            *sum += i32::from(c) * i32::from(q);
        }
    }
    sums.iter().sum::<i32>() + tail
}

/// The order of search results: best score first, then the lowest id, so that equal scores come in
/// a stable order.
fn best_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
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

    /// Unexpired rows of `partition` scoring at least `min_score` against `query`, best first
    /// (equal scores: lowest id first), at most `max`.
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
        let query_view = ArrayView1::from(query);
        let mut hits: Vec<Candidate> = part
            .shortlist(query, min_score, max, now_ms)
            .into_iter()
            .filter_map(|row| {
                let vector = ArrayView1::from(&part.vectors[row * part.dim..(row + 1) * part.dim]);
                let score = vector.dot(&query_view);
                let row = &part.rows[row];
                (score >= min_score).then(|| Candidate { id: row.id, score, prompt: row.prompt.clone() })
            })
            .collect();
        if hits.len() > max {
            hits.select_nth_unstable_by(max - 1, best_first);
            hits.truncate(max);
        }
        hits.sort_unstable_by(best_first);
        Ok(hits)
    }

    /// Whether `vector` may go into `partition`: not empty, not too long, and of the partition's
    /// dimension.
    pub fn check(&self, partition: &str, vector: &[f32]) -> Result<(), CacheError> {
        match self.partitions.get(partition) {
            _ if vector.is_empty() => Err(CacheError::Vector("empty vector".to_owned())),
            _ if vector.len() > MAX_DIMENSIONS => {
                Err(CacheError::Vector(format!("{} dimensions, more than {MAX_DIMENSIONS}", vector.len())))
            }
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
            codes: Vec::new(),
            scales: Vec::new(),
            rows: Vec::new(),
            row_of: HashMap::new(),
        });
        self.inserted += 1;
        part.row_of.insert(entry.id, part.rows.len());
        part.vectors.extend_from_slice(entry.vector);
        let quantised = Quantised::new(entry.vector);
        // c + 128, in 0..=255.
        part.codes.extend(quantised.codes.iter().map(|c| c.cast_unsigned().wrapping_add(128)));
        part.scales.push(quantised.scale);
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
    /// The rows whose exact score may put them among the best `max` unexpired rows scoring at
    /// least `min_score`, from the bounds the codes give: a superset of the search's result.
    fn shortlist(&self, query: &[f32], min_score: f32, max: usize, now_ms: u64) -> Vec<usize> {
        if max == 0 {
            return Vec::new();
        }
        let query = QueryCodes::new(query);
        let mut shortlist: Vec<Bounds> = (self.codes.chunks_exact(self.dim).zip(&self.scales).enumerate())
            .map(|(row, (codes, scale))| query.bounds(row, codes, scale))
            // The expiry second: the codes are what a search reads anyway, the rows are not.
            .filter(|b| b.upper >= min_score && self.rows[b.row].expires_ms > now_ms)
            .collect();
        if shortlist.len() > max {
            // `max` rows score at least the `max`-th highest lower bound. When that floor is above
            // `min_score`, they all qualify, so every row of the result scores at least the floor
            // too, and rows whose upper bound is below it cannot make it (when it is not, the
            // filter above was the stricter). Rows tied with the result's last score all stay, so
            // the tie order of `best_first` holds.
            shortlist.select_nth_unstable_by(max - 1, |a, b| b.lower.total_cmp(&a.lower));
            let floor = shortlist[max - 1].lower;
            shortlist.retain(|b| b.upper >= floor);
        }
        shortlist.into_iter().map(|b| b.row).collect()
    }

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
            self.row_of.insert(self.rows[last].id, row);
        }
        swap_remove_row(&mut self.vectors, self.dim, row);
        swap_remove_row(&mut self.codes, self.dim, row);
        self.scales.swap_remove(row);
        let removed = self.rows.swap_remove(row);
        self.row_of.remove(&removed.id);
    }
}

/// `Vec::swap_remove` for a row-major matrix with rows of `dim` items.
fn swap_remove_row<T: Copy>(matrix: &mut Vec<T>, dim: usize, row: usize) {
    let last = matrix.len() / dim - 1;
    matrix.copy_within(last * dim..(last + 1) * dim, row * dim);
    matrix.truncate(last * dim);
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ndarray::ArrayView2;

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

    /// `base` moved by `spread` in a random direction, normalised.
    fn near(seed: &mut u64, base: &[f32], spread: f32) -> Vec<f32> {
        let moved: Vec<f32> = base.iter().zip(random_unit(seed, base.len())).map(|(b, r)| b + spread * r).collect();
        normalised(&moved)
    }

    /// What the search must return: every unexpired row scored in f32 by one ndarray
    /// matrix-vector product (the search before the index had codes), filtered, sorted, cut.
    fn exact_search(
        index: &Index<u32>,
        partition: &str,
        query: &[f32],
        min_score: f32,
        max: usize,
        now_ms: u64,
    ) -> Vec<Candidate> {
        let Some(part) = index.partitions.get(partition) else { return Vec::new() };
        let matrix = ArrayView2::from_shape((part.rows.len(), part.dim), &part.vectors).expect("row-major");
        let scores = matrix.dot(&ArrayView1::from(query));
        let mut hits: Vec<Candidate> = (scores.iter().zip(&part.rows))
            .filter(|&(&score, row)| score >= min_score && row.expires_ms > now_ms)
            .map(|(&score, row)| Candidate { id: row.id, score, prompt: row.prompt.clone() })
            .collect();
        hits.sort_by(best_first);
        hits.truncate(max);
        hits
    }

    /// Every row's codes and scale are those of its own vector, whatever moved.
    fn assert_codes_follow_vectors(index: &Index<u32>) {
        for part in index.partitions.values() {
            assert_eq!(part.codes.len(), part.vectors.len());
            assert_eq!((part.scales.len(), part.vectors.len()), (part.rows.len(), part.rows.len() * part.dim));
            for (row, vector) in part.vectors.chunks_exact(part.dim).enumerate() {
                let quantised = Quantised::new(vector);
                let codes = &part.codes[row * part.dim..(row + 1) * part.dim];
                let offset: Vec<i16> = quantised.codes.iter().map(|&c| i16::from(c) + 128).collect();
                assert_eq!(codes.iter().map(|&c| i16::from(c)).collect::<Vec<_>>(), offset, "codes of row {row}");
                assert_eq!(part.scales[row], quantised.scale, "scale of row {row}");
            }
        }
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
        assert_codes_follow_vectors(&index);
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
        let long = vec![0.0; MAX_DIMENSIONS + 1];
        assert!(matches!(index.check("q", &long), Err(CacheError::Vector(_))));
        assert!(index.check("q", &long[1..]).is_ok());
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
        assert_codes_follow_vectors(&index);
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

    /// The bounds hold the exact f32 score, and are tight enough to leave few rows to score.
    #[test]
    fn the_bounds_hold_the_exact_score() {
        let mut seed = 3;
        let dim = 384;
        let rows: Vec<Vec<f32>> = (0..200).map(|_| random_unit(&mut seed, dim)).collect();
        let mut widest = 0.0_f32;
        let mut queries: Vec<Vec<f32>> = rows.iter().map(|r| near(&mut seed, r, 0.01)).collect();
        queries.extend((0..20).map(|_| random_unit(&mut seed, dim)));
        for query in queries {
            let query_codes = QueryCodes::new(&query);
            for (row, vector) in rows.iter().enumerate() {
                let quantised = Quantised::new(vector);
                let codes: Vec<u8> = quantised.codes.iter().map(|c| c.cast_unsigned().wrapping_add(128)).collect();
                let bounds = query_codes.bounds(row, &codes, &quantised.scale);
                let exact = ArrayView1::from(vector).dot(&ArrayView1::from(&query));
                assert!(bounds.lower <= exact && exact <= bounds.upper, "{exact} out of {bounds:?}");
                widest = widest.max(bounds.upper - bounds.lower);
            }
        }
        assert!(widest < 0.025, "bounds {widest} wide for unit vectors of {dim} dimensions");
    }

    /// Search gives exactly what scoring every row in f32 gives. Rows: random unit vectors,
    /// clusters of near-duplicates down to identical vectors (equal scores), vectors that are not
    /// unit (the bounds use measured norms), expired rows; dimensions with and without a remainder
    /// for the 32-wide kernel; thresholds at, just above and just below actual scores.
    #[test]
    fn search_matches_the_exact_f32_search() {
        let mut seed = 11;
        let (mut compared, mut found, mut cut) = (0, 0, 0);
        for dim in [1, 5, 37, 384] {
            let mut index = Index::new(CacheLimits::default());
            let mut id = 0;
            let bases: Vec<Vec<f32>> = (0..10).map(|_| random_unit(&mut seed, dim)).collect();
            let mut rows: Vec<Vec<f32>> = (0..60).map(|_| random_unit(&mut seed, dim)).collect();
            for base in &bases {
                rows.extend([0.0, 0.0, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1].map(|spread| near(&mut seed, base, spread)));
                rows.extend([0.5, 2.0].map(|factor| base.iter().map(|x| x * factor).collect()));
            }
            for vector in &rows {
                id += 1;
                // Every fifth row has expired by the time of the searches.
                let expires_ms = if id % 5 == 0 { NOW + 10 } else { NOW + 1_000 };
                add(&mut index, "p", id, vector, expires_ms);
            }
            let now = NOW + 10;
            let mut queries: Vec<Vec<f32>> = (bases.iter())
                .flat_map(|base| [base.clone(), near(&mut seed, base, 1e-3), near(&mut seed, base, 0.05)])
                .collect();
            queries.extend((0..10).map(|_| random_unit(&mut seed, dim)));
            for query in queries {
                let all = exact_search(&index, "p", &query, f32::NEG_INFINITY, usize::MAX, now);
                let mut thresholds = vec![-1.0, 0.0, 0.5, 0.9, 0.999, 2.0];
                for rank in [0, 1, 2, 7, 30] {
                    let Some(hit) = all.get(rank) else { continue };
                    thresholds.extend([hit.score, hit.score.next_up(), hit.score.next_down()]);
                }
                for min_score in thresholds {
                    for max in [1, 2, 10, usize::MAX] {
                        let expected: Vec<Candidate> =
                            all.iter().filter(|c| c.score >= min_score).take(max).cloned().collect();
                        let got = index.search("p", &query, min_score, max, now).expect("search");
                        assert_eq!(got, expected, "{dim} dimensions, min_score {min_score}, max {max}");
                        compared += 1;
                        found += got.len();
                        cut += usize::from(got.len() == max);
                    }
                }
            }
        }
        // The comparisons were not vacuous: many found rows, many were cut at `max`.
        assert!(compared > 10_000 && found > 50_000 && cut > 3_000, "{compared} {found} {cut}");
    }

    /// Zero, tiny, huge, NaN and infinite vectors, as queries or rows: the same as the exact search.
    #[test]
    fn degenerate_vectors_give_what_the_exact_search_gives() {
        let mut index = Index::new(CacheLimits::default());
        let rows = [
            [0.6, 0.8, 0.0],
            [0.0; 3],
            [f32::NAN, 1.0, 0.0],
            [f32::INFINITY, 0.0, 0.0],
            [1.0, 0.0, 0.0],
            [1e-30, 1e-25, 0.0],
        ];
        for (id, vector) in (1..).zip(&rows) {
            add(&mut index, "p", id, vector, NOW + 10);
        }
        let queries = [
            [1.0, 0.0, 0.0],
            [0.0; 3],
            [f32::NAN, 0.0, 0.0],
            [f32::NEG_INFINITY, 1.0, 0.0],
            [1e-40, 1e-20, 0.0],
            [3e20, 0.0, 1.0],
        ];
        for query in queries {
            for min_score in [f32::NEG_INFINITY, -1.0, 0.0, 0.5, f32::INFINITY, f32::NAN] {
                for max in [1, 2, 10] {
                    let expected = exact_search(&index, "p", &query, min_score, max, NOW);
                    let got = index.search("p", &query, min_score, max, NOW).expect("search");
                    assert_eq!(got, expected, "query {query:?}, min_score {min_score}, max {max}");
                }
            }
        }
        let found = index.search("p", &[1.0, 0.0, 0.0], 0.0, 10, NOW).expect("search");
        assert_eq!(ids(&found), [4, 5, 1, 6, 2], "the infinite row first; NaN never matches");
    }

    /// The codes leave few rows to score exactly, with a high threshold and with a low one and a
    /// small `max`.
    #[test]
    fn few_rows_are_scored_exactly() {
        let mut seed = 5;
        let mut index = Index::new(CacheLimits::default());
        let rows: Vec<Vec<f32>> = (0..2_000).map(|_| random_unit(&mut seed, 64)).collect();
        for (id, vector) in (0..).zip(&rows) {
            add(&mut index, "p", id, vector, NOW + 10);
        }
        let query = near(&mut seed, &rows[17], 1e-3);
        let part = &index.partitions["p"];
        let shortlisted = part.shortlist(&query, 0.9, 5, NOW);
        assert_eq!(shortlisted, [part.row_of[&17]]);
        let shortlisted = part.shortlist(&query, -1.0, 3, NOW).len();
        assert!((3..50).contains(&shortlisted), "{shortlisted} rows to score for the best 3");
        assert_eq!(ids(&index.search("p", &query, 0.9, 5, NOW).expect("search")), [17]);
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
        // Each way over all queries in one go: interleaving them would have every search start with
        // its data evicted from L2 by the other's 15 MB, which only the benchmark does.
        let time = |search: &dyn Fn(&[f32]) -> Vec<Candidate>| -> (Vec<f64>, Vec<Vec<Candidate>>) {
            (queries.iter())
                .map(|query| {
                    let started = Instant::now();
                    let hits = search(query);
                    (started.elapsed().as_secs_f64() * 1e6, hits)
                })
                .unzip()
        };
        // A low threshold so the top-k selection is part of what is measured.
        let (fast, hits) = time(&|query| index.search("p", query, 0.1, 5, NOW).expect("search"));
        let (exact, expected) = time(&|query| exact_search(&index, "p", query, 0.1, 5, NOW));
        assert_eq!(hits, expected);
        let found: usize = hits.iter().map(Vec::len).sum();
        for (name, mut micros) in [("search", fast), ("exact f32 scan", exact)] {
            micros.sort_by(f64::total_cmp);
            let at = |q: f64| micros[((micros.len() as f64 * q) as usize).min(micros.len() - 1)];
            println!(
                "{name} over {ENTRIES} x {DIM}: p50 {:.0} us, p99 {:.0} us, max {:.0} us ({SEARCHES} searches, {found} candidates)",
                at(0.50),
                at(0.99),
                at(1.0)
            );
        }
    }
}
