//! C# tokens, as far as policy expressions need them: identifiers, numbers, strings (regular,
//! verbatim, interpolated), chars, punctuation and comments. The document reader uses the same
//! lexer to find where an `@(...)` or `@{...}` ends, so a `)` or `"` inside a string or comment
//! never ends an expression early.

use crate::Position;

/// Interpolated strings nest (`$"{$"{x}"}"`); deeper than this is refused rather than recursed.
const MAX_INTERPOLATION_DEPTH: usize = 8;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
    Ident(String),
    Int(i64),
    Double(f64),
    Str(String),
    Char(char),
    Interpolated(Vec<Part>),
    Punct(&'static str),
    /// A character C# has but policy expressions do not use (`#`, `\`, ...); the parser refuses it.
    Unknown(char),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Part {
    Text(String),
    /// `{expr}`, with a format or alignment suffix (`:F2`, `,5`) when one was written.
    Hole {
        tokens: Vec<Token>,
        position: Position,
        suffix: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Token {
    pub tok: Tok,
    pub position: Position,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LexError {
    pub position: Position,
    pub message: String,
}

/// Longest first, so `??` wins over `?` and `==` over `=`.
const PUNCTUATION: &[&str] = &[
    "??=", "=>", "==", "!=", "<=", ">=", "&&", "||", "??", "?.", "?[", "++", "--", "+=", "-=", "*=", "/=", "%=", "&=",
    "|=", "^=", "::", "->", "(", ")", "{", "}", "[", "]", ".", ",", ";", ":", "?", "+", "-", "*", "/", "%", "!", "<",
    ">", "=", "&", "|", "^", "~",
];

pub(crate) struct Lexer<'a> {
    src: &'a str,
    offset: usize,
    position: Position,
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str, position: Position) -> Self {
        Lexer { src, offset: 0, position }
    }

    /// Byte offset of the next character not yet read.
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    pub(crate) fn position(&self) -> Position {
        self.position
    }

    fn rest(&self) -> &'a str {
        &self.src[self.offset..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.rest().chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.offset += c.len_utf8();
        self.position = self.position.after(c);
        Some(c)
    }

    fn error<T>(&self, position: Position, message: impl Into<String>) -> Result<T, LexError> {
        Err(LexError { position, message: message.into() })
    }

    /// Skips whitespace and comments.
    fn skip_trivia(&mut self) -> Result<(), LexError> {
        loop {
            let rest = self.rest();
            if rest.starts_with("//") {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.bump();
                }
            } else if rest.starts_with("/*") {
                let start = self.position;
                self.bump();
                self.bump();
                loop {
                    if self.rest().starts_with("*/") {
                        self.bump();
                        self.bump();
                        break;
                    }
                    if self.bump().is_none() {
                        return self.error(start, "this `/*` comment is never closed: add `*/`");
                    }
                }
            } else if self.peek().is_some_and(char::is_whitespace) {
                self.bump();
            } else {
                return Ok(());
            }
        }
    }

    /// The next token, or `None` at the end of the input.
    pub(crate) fn next_token(&mut self) -> Result<Option<Token>, LexError> {
        self.next_token_at_depth(0)
    }

    fn next_token_at_depth(&mut self, depth: usize) -> Result<Option<Token>, LexError> {
        self.skip_trivia()?;
        let position = self.position;
        let Some(c) = self.peek() else { return Ok(None) };
        let rest = self.rest();
        let tok = if rest.starts_with("$@\"") || rest.starts_with("@$\"") {
            self.bump();
            self.bump();
            self.interpolated(true, depth)?
        } else if rest.starts_with("$\"") {
            self.bump();
            self.interpolated(false, depth)?
        } else if rest.starts_with("@\"") {
            self.bump();
            Tok::Str(self.verbatim_string()?)
        } else if c == '"' {
            Tok::Str(self.regular_string()?)
        } else if c == '\'' {
            self.char_literal()?
        } else if c == '@' && self.peek_second().is_some_and(is_ident_start) {
            // A verbatim identifier such as `@class`.
            self.bump();
            Tok::Ident(self.identifier())
        } else if is_ident_start(c) {
            Tok::Ident(self.identifier())
        } else if c.is_ascii_digit() {
            self.number()?
        } else if let Some(p) = PUNCTUATION.iter().find(|p| rest.starts_with(**p)) {
            for _ in 0..p.len() {
                self.bump();
            }
            Tok::Punct(p)
        } else {
            self.bump();
            Tok::Unknown(c)
        };
        Ok(Some(Token { tok, position }))
    }

    fn identifier(&mut self) -> String {
        let start = self.offset;
        while self.peek().is_some_and(|c| c == '_' || c.is_alphanumeric()) {
            self.bump();
        }
        self.src[start..self.offset].to_owned()
    }

    fn number(&mut self) -> Result<Tok, LexError> {
        let position = self.position;
        let start = self.offset;
        if self.rest().starts_with("0x") || self.rest().starts_with("0X") {
            self.bump();
            self.bump();
            let digits = self.offset;
            while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                self.bump();
            }
            return match i64::from_str_radix(&self.src[digits..self.offset], 16) {
                Ok(n) => Ok(Tok::Int(n)),
                Err(_) => self.error(position, "this hexadecimal number is malformed or too large"),
            };
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        let mut is_double = false;
        if self.peek() == Some('.') && self.peek_second().is_some_and(|c| c.is_ascii_digit()) {
            is_double = true;
            self.bump();
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
        }
        let digits = &self.src[start..self.offset];
        // Type suffixes: L/l (long), D/d (double); the value is the same for these expressions.
        if let Some(suffix) = self.peek().filter(|c| matches!(c, 'L' | 'l' | 'D' | 'd')) {
            self.bump();
            is_double |= matches!(suffix, 'D' | 'd');
        }
        if self.peek().is_some_and(is_ident_start) {
            return self.error(position, "this number has a suffix or exponent that policy expressions do not support");
        }
        if is_double {
            match digits.parse() {
                Ok(n) => Ok(Tok::Double(n)),
                Err(_) => self.error(position, "this number is malformed"),
            }
        } else {
            match digits.parse() {
                Ok(n) => Ok(Tok::Int(n)),
                Err(_) => self.error(position, "this number is too large"),
            }
        }
    }

    fn escape(&mut self, quote_position: Position) -> Result<char, LexError> {
        let position = self.position;
        let Some(c) = self.bump() else { return self.error(quote_position, "this string is never closed") };
        Ok(match c {
            '\\' => '\\',
            '"' => '"',
            '\'' => '\'',
            '0' => '\0',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'a' => '\u{7}',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'v' => '\u{b}',
            'u' => {
                let start = self.offset;
                for _ in 0..4 {
                    if !self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                        return self.error(position, "`\\u` takes four hexadecimal digits");
                    }
                    self.bump();
                }
                let code = u32::from_str_radix(&self.src[start..self.offset], 16).unwrap_or(0xfffd);
                char::from_u32(code).unwrap_or('\u{fffd}')
            }
            other => return self.error(position, format!("`\\{other}` is not a C# escape sequence")),
        })
    }

    fn regular_string(&mut self) -> Result<String, LexError> {
        let start = self.position;
        self.bump();
        let mut value = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return self.error(start, "this string is never closed on its line: add the closing `\"`");
                }
                Some('"') => return Ok(value),
                Some('\\') => value.push(self.escape(start)?),
                Some(c) => value.push(c),
            }
        }
    }

    fn verbatim_string(&mut self) -> Result<String, LexError> {
        let start = self.position;
        self.bump();
        let mut value = String::new();
        loop {
            match self.bump() {
                None => return self.error(start, "this verbatim string is never closed: add the closing `\"`"),
                Some('"') if self.peek() == Some('"') => {
                    self.bump();
                    value.push('"');
                }
                Some('"') => return Ok(value),
                Some(c) => value.push(c),
            }
        }
    }

    fn char_literal(&mut self) -> Result<Tok, LexError> {
        let start = self.position;
        self.bump();
        let c = match self.bump() {
            Some('\\') => self.escape(start)?,
            Some(c) if c != '\'' && c != '\n' => c,
            _ => return self.error(start, "this character literal is empty or broken"),
        };
        if self.bump() != Some('\'') {
            return self.error(start, "this character literal is never closed: add the closing `'`");
        }
        Ok(Tok::Char(c))
    }

    /// After the `$"` (or `$@"`): text, `{{`/`}}` escapes and `{expr[,alignment][:format]}` holes.
    fn interpolated(&mut self, verbatim: bool, depth: usize) -> Result<Tok, LexError> {
        let start = self.position;
        if depth >= MAX_INTERPOLATION_DEPTH {
            return self.error(start, "interpolated strings are nested too deeply");
        }
        self.bump();
        let mut parts = Vec::new();
        let mut text = String::new();
        loop {
            let Some(c) = self.bump() else {
                return self.error(start, "this interpolated string is never closed: add the closing `\"`");
            };
            match c {
                '"' if verbatim && self.peek() == Some('"') => {
                    self.bump();
                    text.push('"');
                }
                '"' => break,
                '\n' if !verbatim => {
                    return self
                        .error(start, "this interpolated string is never closed on its line: add the closing `\"`");
                }
                '\\' if !verbatim => text.push(self.escape(start)?),
                '{' if self.peek() == Some('{') => {
                    self.bump();
                    text.push('{');
                }
                '}' if self.peek() == Some('}') => {
                    self.bump();
                    text.push('}');
                }
                '}' => return self.error(self.position, "a lone `}` in an interpolated string must be written `}}`"),
                '{' => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(self.hole(depth)?);
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Tok::Interpolated(parts))
    }

    /// After the `{` of a hole: its tokens up to the `}` that closes it.
    fn hole(&mut self, depth: usize) -> Result<Part, LexError> {
        let position = self.position;
        let mut tokens = Vec::new();
        let mut brackets = 0usize;
        loop {
            self.skip_trivia()?;
            match self.peek() {
                None => return self.error(position, "this `{` in an interpolated string is never closed: add `}`"),
                Some('}') if brackets == 0 => {
                    self.bump();
                    return Ok(Part::Hole { tokens, position, suffix: None });
                }
                Some(c @ (':' | ',')) if brackets == 0 => {
                    let suffix_start = self.offset;
                    while self.peek().is_some_and(|c| c != '}' && c != '"') {
                        self.bump();
                    }
                    if self.bump() != Some('}') {
                        return self
                            .error(position, format!("the `{c}` suffix of this hole is never closed: add `}}`"));
                    }
                    let suffix = self.src[suffix_start..self.offset - 1].to_owned();
                    return Ok(Part::Hole { tokens, position, suffix: Some(suffix) });
                }
                _ => {}
            }
            let Some(token) = self.next_token_at_depth(depth + 1)? else { continue };
            match token.tok {
                Tok::Punct("(" | "[" | "{" | "?[") => brackets += 1,
                Tok::Punct(")" | "]" | "}") => brackets = brackets.saturating_sub(1),
                _ => {}
            }
            tokens.push(token);
        }
    }
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

/// Every token of `src`, which starts at `position`.
pub(crate) fn tokenize(src: &str, position: Position) -> Result<Vec<Token>, LexError> {
    let mut lexer = Lexer::new(src, position);
    let mut tokens = Vec::new();
    while let Some(token) = lexer.next_token()? {
        tokens.push(token);
    }
    Ok(tokens)
}

/// `src` starts with `@(` or `@{` at `position`; returns the byte length of the expression up to
/// and including the bracket that closes the first one, matching brackets only outside strings,
/// chars and comments.
pub(crate) fn expression_length(src: &str, position: Position) -> Result<usize, LexError> {
    let mut lexer = Lexer::new(&src[1..], position.after('@'));
    let mut open: Vec<(&'static str, Position)> = Vec::new();
    while let Some(token) = lexer.next_token()? {
        let closer = match token.tok {
            Tok::Punct("(") => Some(")"),
            Tok::Punct("[" | "?[") => Some("]"),
            Tok::Punct("{") => Some("}"),
            _ => None,
        };
        if let Some(closer) = closer {
            open.push((closer, token.position));
            continue;
        }
        if let Tok::Punct(p @ (")" | "]" | "}")) = token.tok {
            match open.pop() {
                Some((expected, _)) if expected == p => {
                    if open.is_empty() {
                        return Ok(1 + lexer.offset());
                    }
                }
                Some((expected, opened)) => {
                    return Err(LexError {
                        position: token.position,
                        message: format!("`{p}` does not match the bracket opened at {opened}: expected `{expected}`"),
                    });
                }
                None => break,
            }
        } else if open.is_empty() {
            // Callers only call this after `@(` or `@{`, so the first token is a bracket.
            break;
        }
    }
    let (closer, opened) = open.first().copied().unwrap_or((")", position));
    Err(LexError {
        position: opened,
        message: format!(
            "this policy expression is never closed: add the matching `{closer}` (check brackets and string quotes up to {})",
            lexer.position()
        ),
    })
}
