//! The semantic cache: answers for prompts that ask what an earlier prompt asked.
//!
//! `guard` decides whether a similar cached prompt really asks the same thing; `eval` measures
//! the whole hit decision (embedding, threshold, guard) on labelled pairs for `aigw cache-eval`.

pub mod eval;
pub mod guard;
