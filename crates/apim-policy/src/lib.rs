//! API Management policy documents as real files write them.
//!
//! - [`document`] reads a policy document leniently: API Management accepts raw `"` inside
//!   `"`-quoted attribute expressions and raw `<` in attributes and text, so `@(...)` and `@{...}`
//!   are matched with C#-aware bracket and string rules before anything is read as XML. Named
//!   values (`{{name}}`), deployment placeholders (`{backend-id}`) and `<include-fragment>` are
//!   resolved while reading.
//! - [`expression`] compiles the C# subset that real policies use into an AST once, refusing
//!   anything else with its line and column.
//! - [`eval`] evaluates a compiled expression per request against [`eval::RequestContext`], which
//!   the gateway implements. Expressions can never read a subscription key or a backend secret:
//!   see [`eval::RequestContext`] and [`eval::is_secret_header`].

pub mod document;
pub mod eval;
pub mod expression;
mod lexer;

use std::fmt;

/// A place in a policy document: 1-based line and column (columns count characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub line: u32,
    pub column: u32,
}

impl Position {
    pub const START: Position = Position { line: 1, column: 1 };

    /// The position after `text` when `text` starts here.
    pub(crate) fn advanced_by(self, text: &str) -> Position {
        text.chars().fold(self, Position::after)
    }

    pub(crate) fn after(self, c: char) -> Position {
        if c == '\n' {
            Position { line: self.line + 1, column: 1 }
        } else {
            Position { column: self.column + 1, ..self }
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

pub use document::{Attribute, Document, Element, FragmentLoader, Node, ReadError, Sources, Text};
pub use eval::{EvalError, JsonToken, RequestContext, RequestSnapshot, Value};
pub use expression::{CompileError, Program, compile, compile_value};
