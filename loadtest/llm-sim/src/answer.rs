//! Deterministic answer text: a pure function of the last user message, so
//! tests can assert on it and caches in front of the sim behave predictably.

use std::fmt::Write;

use sha2::{Digest, Sha256};

use crate::tokens;

/// Vocabulary for simulated answers; short common words keep the token count
/// close to the word count.
const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "token", "stream", "answer", "gateway",
    "request", "latency", "simple", "result", "value", "system", "data", "cloud", "river", "light", "green", "table",
    "music", "paper", "window", "garden", "stone", "signal", "bridge", "market", "yellow", "silver", "ocean", "forest",
    "planet", "engine", "circle", "number", "letter", "summer", "winter", "morning", "evening", "simply", "really",
    "always", "never", "often", "again", "still", "maybe", "today", "later", "first", "second", "little", "large",
    "small", "bright", "quiet", "rapid",
];

/// sha256 of the last user message's text; its first 8 hex digits are the
/// `[p:...]` marker and the `x-sim-prompt-hash` header.
pub struct PromptHash {
    digest: [u8; 32],
    short: String,
}

impl PromptHash {
    pub fn of(text: &str) -> Self {
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        let short = hex::encode(&digest[..4]);
        Self { digest, short }
    }

    pub fn short(&self) -> &str {
        &self.short
    }

    /// 24 hex digits, enough for unique-looking ids such as `call_...`.
    pub fn long(&self) -> String {
        hex::encode(&self.digest[..12])
    }

    /// Seed for everything derived from the prompt; independent of the bytes
    /// shown in the marker.
    pub fn seed(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.digest[4..12]);
        u64::from_le_bytes(b)
    }
}

/// splitmix64: tiny, stable across crate versions (unlike a library RNG whose
/// stream could change), good enough for picking words.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Answer text plus where it splits into streamed pieces (one word each,
/// with its leading space), so streamed and non-streamed answers match.
#[derive(Debug)]
pub struct Answer {
    text: String,
    piece_ends: Vec<usize>,
    /// Cut short by `max_tokens` (finish_reason `length`).
    pub truncated: bool,
}

impl Answer {
    /// `Simulated answer [p:xxxxxxxx]: ` followed by 8..=31 words chosen by
    /// the prompt hash.
    pub fn simulated(hash: &PromptHash) -> Self {
        let seed = hash.seed();
        let words = 8 + (seed % 24) as usize;
        let mut rng = SplitMix::new(seed);
        let mut text = String::with_capacity(32 + words * 8);
        let _ = write!(text, "Simulated answer [p:{}]:", hash.short());
        for _ in 0..words {
            text.push(' ');
            text.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
        }
        text.push('.');
        Self::from_text(text)
    }

    /// Final answer after tool calls: quotes what the tools returned.
    pub fn tool_result(results: &[String], hash: &PromptHash) -> Self {
        let label = if results.len() == 1 { "result" } else { "results" };
        let text = format!("Based on the tool {label}: {} [p:{}]", results.join("; "), hash.short());
        Self::from_text(text)
    }

    fn from_text(text: String) -> Self {
        let bytes = text.as_bytes();
        // Split before a space that follows a non-whitespace byte: that is
        // always a boundary of o200k's pre-tokenizer, so per-piece token
        // counts add up to the count of the whole text.
        let mut piece_ends: Vec<usize> =
            (1..bytes.len()).filter(|&i| bytes[i] == b' ' && !bytes[i - 1].is_ascii_whitespace()).collect();
        piece_ends.push(bytes.len());
        Self { text, piece_ends, truncated: false }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn pieces(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.piece_ends.iter().copied());
        starts.zip(self.piece_ends.iter().copied()).map(|(s, e)| &self.text[s..e]).filter(|p| !p.is_empty())
    }

    pub fn completion_tokens(&self) -> usize {
        tokens::count(&self.text)
    }

    /// Truncates to at most `max_tokens` tokens, at a piece boundary when
    /// possible and inside the first piece that does not fit otherwise.
    pub fn limit(&mut self, max_tokens: usize) {
        let mut used = 0;
        let mut start = 0;
        for (i, &end) in self.piece_ends.iter().enumerate() {
            let ids = tokens::encode(&self.text[start..end]);
            if used + ids.len() <= max_tokens {
                used += ids.len();
                start = end;
                continue;
            }
            // Keep as many of this piece's tokens as fit and still decode to
            // whole characters.
            let partial =
                (0..=max_tokens - used).rev().find_map(|keep| tokens::decode(&ids[..keep])).unwrap_or_default();
            self.text.truncate(start);
            self.text.push_str(&partial);
            self.piece_ends.truncate(i);
            self.piece_ends.push(self.text.len());
            self.truncated = true;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_hash_of_prompt() {
        let h = PromptHash::of("What is the capital of France?");
        let expected = &hex::encode(Sha256::digest(b"What is the capital of France?"))[..8];
        assert_eq!(h.short(), expected);
        let a = Answer::simulated(&h);
        assert!(a.text().starts_with(&format!("Simulated answer [p:{expected}]: ")));
        assert!(!a.truncated);
    }

    #[test]
    fn answer_is_deterministic_and_sized_by_hash() {
        for prompt in ["a", "b", "hello there", "", "ünïcode ✓"] {
            let h = PromptHash::of(prompt);
            let a = Answer::simulated(&h);
            let b = Answer::simulated(&PromptHash::of(prompt));
            assert_eq!(a.text(), b.text());
            let words = a.text().split(' ').count() - 3;
            assert_eq!(words as u64, 8 + h.seed() % 24);
        }
        assert_ne!(Answer::simulated(&PromptHash::of("a")).text(), Answer::simulated(&PromptHash::of("b")).text());
    }

    #[test]
    fn pieces_reassemble_and_token_counts_add_up() {
        for prompt in ["x", "y", "z", "tool test"] {
            let a = Answer::simulated(&PromptHash::of(prompt));
            let pieces: Vec<&str> = a.pieces().collect();
            assert_eq!(pieces.concat(), a.text());
            assert!(pieces[1..].iter().all(|p| p.starts_with(' ')));
            let sum: usize = pieces.iter().map(|p| tokens::count(p)).sum();
            assert_eq!(sum, a.completion_tokens());
        }
    }

    #[test]
    fn limit_truncates_and_keeps_marker_when_room() {
        let h = PromptHash::of("limit me");
        let full = Answer::simulated(&h).completion_tokens();
        let mut a = Answer::simulated(&h);
        a.limit(full);
        assert!(!a.truncated, "exact fit is not truncation");

        let mut a = Answer::simulated(&h);
        a.limit(14);
        assert!(a.truncated);
        assert!(a.completion_tokens() <= 14);
        assert!(a.text().contains(&format!("[p:{}]", h.short())));
        assert_eq!(a.pieces().collect::<String>(), a.text());

        let mut tiny = Answer::simulated(&h);
        tiny.limit(1);
        assert!(tiny.truncated);
        assert_eq!(tiny.completion_tokens(), 1);
    }

    #[test]
    fn tool_result_quotes_results() {
        let h = PromptHash::of("weather?");
        let a = Answer::tool_result(&["{\"temp\":21}".to_string()], &h);
        assert_eq!(a.text(), format!("Based on the tool result: {{\"temp\":21}} [p:{}]", h.short()));
    }
}
