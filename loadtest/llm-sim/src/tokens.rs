//! o200k_base token counting (the tokenizer of gpt-4o / gpt-4.1).

use tiktoken_rs::{CoreBPE, Rank, o200k_base_singleton};

fn bpe() -> &'static CoreBPE {
    o200k_base_singleton()
}

/// Builds the encoder tables eagerly (they are a process-wide singleton).
pub fn init() {
    bpe();
}

/// Tokens of `text` as ordinary text: like the API, special-token strings in
/// user content are not treated as control tokens.
pub fn encode(text: &str) -> Vec<Rank> {
    bpe().encode_ordinary(text)
}

pub fn count(text: &str) -> usize {
    encode(text).len()
}

/// `None` for ids outside the vocabulary or that do not form valid UTF-8.
pub fn decode(ids: &[Rank]) -> Option<String> {
    bpe().decode(ids).ok()
}

/// OpenAI's chat accounting (see the openai-cookbook "How to count tokens"):
/// every message costs 3 tokens plus its role and content, a `name` costs one
/// extra token, and the reply is primed with 3 more.
pub struct PromptCounter(usize);

impl PromptCounter {
    pub fn new() -> Self {
        Self(3)
    }

    pub fn message(&mut self, role: &str, content: &str, name: Option<&str>) {
        self.0 += 3 + count(role) + count(content);
        if let Some(name) = name {
            self.0 += 1 + count(name);
        }
    }

    /// Text that is part of a message but not its content (tool call names
    /// and arguments in assistant turns).
    pub fn extra(&mut self, text: &str) {
        self.0 += count(text);
    }

    pub fn total(&self) -> usize {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_known_strings() {
        assert_eq!(count(""), 0);
        assert_eq!(count("hello world"), 2);
        // "<|endoftext|>" is plain text here, so more than one token.
        assert!(count("<|endoftext|>") > 1);
    }

    #[test]
    fn prompt_overhead_matches_cookbook() {
        let mut p = PromptCounter::new();
        p.message("user", "hello world", None);
        // 3 priming + 3 per message + 1 role + 2 content.
        assert_eq!(p.total(), 9);
        p.message("user", "", Some("bob"));
        assert_eq!(p.total(), 9 + 3 + 1 + 1 + count("bob"));
    }
}
