//! Compiles the C# subset that real policy expressions use into an AST, once.
//!
//! `@(expression)` and `@{ statements }` blocks with locals (`var`, typed declarations),
//! assignment, `if`/`else` and `return`. Expressions: literals, `$"..."` interpolation, `?.`,
//! `??`, `?:`, `==` `!=` `<` `>` `<=` `>=`, `&&` `||` `!`, `+ - * / %`, casts `(string)`,
//! `(int)`, `(long)`, `(bool)`, `(double)`.
//!
//! `context`: `Subscription.Id`/`.Name`, `Api.Id`/`.Name`, `Operation.Id`/`.Name`,
//! `Request.IpAddress`, `Request.Headers.GetValueOrDefault(name[, default])`,
//! `Request.Url.Query.GetValueOrDefault(name[, default])`, `Request.Body.As<JObject>([preserveContent: bool])`,
//! `Variables["x"]`, `Variables.GetValueOrDefault[<T>](name[, default])`, `Variables.ContainsKey`,
//! `Response.StatusCode`, `Deployment.Region`. Never `Subscription.Key`/`.PrimaryKey`/`.SecondaryKey`,
//! nor a key header or query parameter by a literal name (see [`crate::eval::is_secret_header`]).
//!
//! On values `.ToString()`, `.ToLower()`, `.ToUpper()`, `.Trim()`, `.Contains`, `.StartsWith`,
//! `.EndsWith`, `.Equals` (the four comparisons with an optional last `StringComparison.*`
//! argument), `.Split`, `.Length`, indexing (`json["messages"]`, `parts[0]`) and
//! `.Value<T>(key)` on JSON; `int.Parse`, `string.Format`, `string.IsNullOrEmpty`,
//! `string.IsNullOrWhiteSpace`, `string.Empty`.
//!
//! Anything else is refused here with its line and column and what it is, never guessed at.

use std::fmt;

use crate::Position;
use crate::eval::{ContextField, RequestPart, Value};
use crate::lexer::{LexError, Part, Tok, Token, expression_length, tokenize};

/// Brackets, unary operators and statements nest at most this deep.
const MAX_NESTING: usize = 32;
/// An expression's tree is at most this deep (long operator chains are trees too).
const MAX_TREE_DEPTH: usize = 128;
/// A program has at most this many tokens; it bounds the tree's size before its depth is checked.
const MAX_TOKENS: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub position: Position,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.message)
    }
}

impl std::error::Error for CompileError {}

impl From<LexError> for CompileError {
    fn from(e: LexError) -> Self {
        CompileError { position: e.position, message: e.message }
    }
}

fn refuse<T>(position: Position, message: impl Into<String>) -> Result<T, CompileError> {
    Err(CompileError { position, message: message.into() })
}

/// A compiled `@(...)` or `@{...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    pub(crate) body: Body,
    /// How many local variable slots a block needs.
    pub(crate) locals: usize,
    pub position: Position,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Body {
    Expression(Expr),
    Block(Vec<Stmt>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Type {
    String,
    Int,
    Bool,
    Double,
    Object,
}

impl Type {
    fn named(name: &str) -> Option<Type> {
        Some(match name {
            "string" | "String" => Type::String,
            "int" | "Int32" | "long" | "Int64" => Type::Int,
            "bool" | "Boolean" => Type::Bool,
            "double" | "Double" => Type::Double,
            "object" | "Object" => Type::Object,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinaryOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    ToString,
    ToLower,
    ToUpper,
    Trim,
    /// The comparisons carry whether a `StringComparison.*IgnoreCase` argument was given.
    Contains(bool),
    StartsWith(bool),
    EndsWith(bool),
    Equals(bool),
    Split,
    /// `JToken.Value<T>(key)`.
    JsonValue(Type),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Segment {
    Text(String),
    Expr(Expr),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Literal(Value),
    Local(usize),
    Interpolated(Vec<Segment>),
    /// `context.Subscription.Id`/`.Name`: `context.Subscription` is null without a subscription.
    Subscription {
        name: bool,
        null_conditional: bool,
        position: Position,
    },
    Context(ContextField),
    /// `context.Response` is null until the backend has answered.
    ResponseStatus {
        null_conditional: bool,
        position: Position,
    },
    /// `GetValueOrDefault(name, default)` on the request's headers or query.
    Lookup {
        part: RequestPart,
        name: Box<Expr>,
        default: Option<Box<Expr>>,
        position: Position,
    },
    Variable {
        name: Box<Expr>,
        position: Position,
    },
    VariableOrDefault {
        name: Box<Expr>,
        ty: Option<Type>,
        default: Option<Box<Expr>>,
        position: Position,
    },
    VariableExists {
        name: Box<Expr>,
        position: Position,
    },
    Body,
    Not(Box<Expr>, Position),
    Negate(Box<Expr>, Position),
    Binary {
        op: BinaryOp,
        left: Box<Expr>,
        right: Box<Expr>,
        position: Position,
    },
    And(Box<Expr>, Box<Expr>, Position),
    Or(Box<Expr>, Box<Expr>, Position),
    Coalesce(Box<Expr>, Box<Expr>),
    Conditional {
        condition: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
        position: Position,
    },
    Cast {
        ty: Type,
        value: Box<Expr>,
        position: Position,
    },
    Method {
        receiver: Box<Expr>,
        method: Method,
        args: Vec<Expr>,
        null_conditional: bool,
        position: Position,
    },
    Index {
        receiver: Box<Expr>,
        index: Box<Expr>,
        null_conditional: bool,
        position: Position,
    },
    Length {
        receiver: Box<Expr>,
        null_conditional: bool,
        position: Position,
    },
    IsNullOrEmpty {
        value: Box<Expr>,
        whitespace: bool,
        position: Position,
    },
    Format {
        format: Box<Expr>,
        args: Vec<Expr>,
        position: Position,
    },
    IntParse(Box<Expr>, Position),
    /// The end of a member chain with a `?.` or `?[` in it: a null there makes the whole chain null.
    NullConditional(Box<Expr>),
}

impl Expr {
    fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Literal(_)
            | Expr::Local(_)
            | Expr::Subscription { .. }
            | Expr::Context(_)
            | Expr::ResponseStatus { .. }
            | Expr::Body => Vec::new(),
            Expr::Interpolated(segments) => {
                segments.iter().filter_map(|s| if let Segment::Expr(e) = s { Some(e) } else { None }).collect()
            }
            Expr::Lookup { name, default, .. } | Expr::VariableOrDefault { name, default, .. } => {
                std::iter::once(&**name).chain(default.as_deref()).collect()
            }
            Expr::Variable { name: e, .. }
            | Expr::VariableExists { name: e, .. }
            | Expr::Not(e, _)
            | Expr::Negate(e, _)
            | Expr::Cast { value: e, .. }
            | Expr::Length { receiver: e, .. }
            | Expr::IsNullOrEmpty { value: e, .. }
            | Expr::IntParse(e, _)
            | Expr::NullConditional(e) => vec![e],
            Expr::Binary { left: a, right: b, .. }
            | Expr::And(a, b, _)
            | Expr::Or(a, b, _)
            | Expr::Coalesce(a, b)
            | Expr::Index { receiver: a, index: b, .. } => vec![a, b],
            Expr::Conditional { condition, then, otherwise, .. } => vec![condition, then, otherwise],
            Expr::Method { receiver: first, args, .. } | Expr::Format { format: first, args, .. } => {
                std::iter::once(&**first).chain(args).collect()
            }
        }
    }

    /// Whether the tree under `self` is deeper than `limit` (looking no deeper than that).
    fn deeper_than(&self, limit: usize) -> bool {
        limit == 0 || self.children().into_iter().any(|c| c.deeper_than(limit - 1))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stmt {
    Assign(usize, Expr),
    If { condition: Expr, then: Vec<Stmt>, otherwise: Vec<Stmt>, position: Position },
    Return(Expr),
}

/// Compiles `value` when it is a policy expression (`@(...)` or `@{...}`, surrounding whitespace
/// allowed); `None` when it is a plain value.
pub fn compile_value(value: &str, position: Position) -> Result<Option<Program>, CompileError> {
    let trimmed = value.trim_start();
    if trimmed.starts_with("@(") || trimmed.starts_with("@{") {
        let lead = &value[..value.len() - trimmed.len()];
        compile(trimmed, position.advanced_by(lead)).map(Some)
    } else {
        Ok(None)
    }
}

/// Compiles `src`, which is `@(...)` or `@{...}` starting at `position`.
pub fn compile(src: &str, position: Position) -> Result<Program, CompileError> {
    let block = if src.starts_with("@{") {
        true
    } else if src.starts_with("@(") {
        false
    } else {
        return refuse(position, "a policy expression starts with `@(` or `@{`");
    };
    let len = expression_length(src, position)?;
    if !src[len..].trim().is_empty() {
        return refuse(
            position.advanced_by(&src[..len]),
            "text follows the policy expression: an expression must be the whole value",
        );
    }
    let inner_start = position.advanced_by(&src[..2]);
    let inner = &src[2..len - 1];
    let tokens = tokenize(inner, inner_start)?;
    if tokens.len() > MAX_TOKENS {
        return refuse(position, format!("this policy expression has more than {MAX_TOKENS} tokens"));
    }
    let end = inner_start.advanced_by(inner);
    let mut locals = Locals::default();
    let mut parser = Parser { tokens: &tokens, next: 0, end, locals: &mut locals, nesting: 0 };
    let body = if block {
        let statements = parser.statements_to_end()?;
        if !always_returns(&statements) {
            return refuse(end, "this block can end without `return`: every path must return a value");
        }
        Body::Block(statements)
    } else {
        if tokens.is_empty() {
            return refuse(position, "`@()` is empty: write an expression inside");
        }
        let e = parser.expression()?;
        parser.expect_end()?;
        Body::Expression(e)
    };
    Ok(Program { body, locals: locals.count, position })
}

fn always_returns(statements: &[Stmt]) -> bool {
    match statements.last() {
        Some(Stmt::Return(_)) => true,
        Some(Stmt::If { then, otherwise, .. }) => always_returns(then) && always_returns(otherwise),
        Some(Stmt::Assign(..)) | None => false,
    }
}

#[derive(Default)]
struct Locals {
    /// Names in scope, innermost last; C# forbids shadowing, so a name is looked up anywhere.
    scopes: Vec<Vec<(String, usize)>>,
    count: usize,
}

impl Locals {
    fn find(&self, name: &str) -> Option<usize> {
        self.scopes.iter().flatten().find(|(n, _)| n == name).map(|(_, slot)| *slot)
    }
}

struct Arg {
    name: Option<String>,
    value: ArgValue,
    position: Position,
}

enum ArgValue {
    Expr(Expr),
    /// `StringComparison.X`, only accepted as the last argument of a string comparison.
    Comparison {
        ignore_case: bool,
    },
}

struct Call {
    generic: Option<(String, Position)>,
    args: Vec<Arg>,
}

enum Op {
    Member { name: String, null_conditional: bool, position: Position, call: Option<Call> },
    Index { index: Expr, null_conditional: bool, position: Position },
}

/// A member chain being resolved: a static path (`context.Request.Headers`) or a value.
enum Chain {
    Path(Vec<String>, Position),
    Value(Expr),
}

struct Parser<'t, 'l> {
    tokens: &'t [Token],
    next: usize,
    /// Where the input ends, for "expected ... here" at the end.
    end: Position,
    locals: &'l mut Locals,
    nesting: usize,
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(name) => format!("`{name}`"),
        Tok::Int(n) => format!("`{n}`"),
        Tok::Double(n) => format!("`{n}`"),
        Tok::Str(_) => "a string".into(),
        Tok::Char(_) => "a character literal".into(),
        Tok::Interpolated(_) => "an interpolated string".into(),
        Tok::Punct(p) => format!("`{p}`"),
        Tok::Unknown(c) => format!("`{c}`"),
    }
}

impl<'t> Parser<'t, '_> {
    fn peek(&self) -> Option<&'t Token> {
        self.tokens.get(self.next)
    }

    fn peek_tok(&self, ahead: usize) -> Option<&'t Tok> {
        self.tokens.get(self.next + ahead).map(|t| &t.tok)
    }

    fn position(&self) -> Position {
        self.peek().map_or(self.end, |t| t.position)
    }

    fn at_punct(&self, p: &str) -> bool {
        matches!(self.peek_tok(0), Some(Tok::Punct(q)) if *q == p)
    }

    fn eat_punct(&mut self, p: &str) -> bool {
        let at = self.at_punct(p);
        if at {
            self.next += 1;
        }
        at
    }

    fn at_ident(&self, name: &str) -> bool {
        matches!(self.peek_tok(0), Some(Tok::Ident(n)) if n == name)
    }

    fn expect_punct(&mut self, p: &str, context: &str) -> Result<(), CompileError> {
        if self.eat_punct(p) {
            return Ok(());
        }
        let found = self.peek().map_or("the end of the expression".into(), |t| describe(&t.tok));
        refuse(self.position(), format!("expected `{p}` {context}, found {found}"))
    }

    fn expect_end(&self) -> Result<(), CompileError> {
        match self.peek() {
            None => Ok(()),
            Some(t) => refuse(
                t.position,
                format!("{} is not supported here: expected the end of the expression", describe(&t.tok)),
            ),
        }
    }

    fn ident(&mut self, what: &str) -> Result<(String, Position), CompileError> {
        match self.peek() {
            Some(Token { tok: Tok::Ident(name), position }) => {
                self.next += 1;
                Ok((name.clone(), *position))
            }
            Some(t) => refuse(t.position, format!("expected {what}, found {}", describe(&t.tok))),
            None => refuse(self.end, format!("expected {what} at the end of the expression")),
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, CompileError>) -> Result<T, CompileError> {
        if self.nesting >= MAX_NESTING {
            return refuse(self.position(), format!("this expression nests more than {MAX_NESTING} deep"));
        }
        self.nesting += 1;
        let result = f(self);
        self.nesting -= 1;
        result
    }

    // ---- statements ----

    fn statements_to_end(&mut self) -> Result<Vec<Stmt>, CompileError> {
        self.locals.scopes.push(Vec::new());
        let mut statements = Vec::new();
        while self.peek().is_some() {
            self.statement(&mut statements)?;
        }
        self.locals.scopes.pop();
        Ok(statements)
    }

    /// `{ ... }`, or a single statement, as the branch of an `if`.
    fn branch(&mut self) -> Result<Vec<Stmt>, CompileError> {
        self.nested(|p| {
            p.locals.scopes.push(Vec::new());
            let mut statements = Vec::new();
            if p.eat_punct("{") {
                while !p.eat_punct("}") {
                    if p.peek().is_none() {
                        return refuse(p.end, "this `{` is never closed: add `}`");
                    }
                    p.statement(&mut statements)?;
                }
            } else {
                p.statement(&mut statements)?;
            }
            p.locals.scopes.pop();
            Ok(statements)
        })
    }

    fn statement(&mut self, out: &mut Vec<Stmt>) -> Result<(), CompileError> {
        let Some(token) = self.peek() else { return refuse(self.end, "expected a statement") };
        let position = token.position;
        match &token.tok {
            Tok::Punct(";") => {
                self.next += 1;
            }
            Tok::Punct("{") => {
                let block = self.branch()?;
                out.extend(block);
            }
            Tok::Ident(word) => match word.as_str() {
                "return" => {
                    self.next += 1;
                    if self.at_punct(";") {
                        return refuse(position, "`return` needs a value in a policy expression");
                    }
                    let value = self.expression()?;
                    self.expect_punct(";", "after the returned value")?;
                    out.push(Stmt::Return(value));
                }
                "if" => {
                    self.next += 1;
                    self.expect_punct("(", "after `if`")?;
                    let condition = self.expression()?;
                    self.expect_punct(")", "after the condition of `if`")?;
                    let then = self.branch()?;
                    let otherwise = if self.at_ident("else") {
                        self.next += 1;
                        self.branch()?
                    } else {
                        Vec::new()
                    };
                    out.push(Stmt::If { condition, then, otherwise, position });
                }
                "for" | "foreach" | "while" | "do" | "switch" | "try" | "catch" | "throw" | "goto" | "break"
                | "continue" | "using" | "lock" | "yield" | "const" => {
                    return refuse(position, format!("`{word}` statements are not supported in policy expressions"));
                }
                _ => self.declaration_or_assignment(out)?,
            },
            other => return refuse(position, format!("a statement cannot start with {}", describe(other))),
        }
        Ok(())
    }

    fn declaration_or_assignment(&mut self, out: &mut Vec<Stmt>) -> Result<(), CompileError> {
        let (first, position) = self.ident("a statement")?;
        match (self.peek_tok(0), self.peek_tok(1)) {
            (Some(Tok::Punct("[")), Some(Tok::Punct("]"))) => {
                return refuse(
                    position,
                    format!("locals of type `{first}[]` are not supported: arrays cannot be declared"),
                );
            }
            (Some(Tok::Punct("<")), Some(Tok::Ident(_))) => {
                return refuse(position, format!("locals of generic type `{first}<...>` are not supported"));
            }
            _ => {}
        }
        if let Some(Tok::Ident(_)) = self.peek_tok(0) {
            // `type name = value;`
            let ty = if first == "var" {
                None
            } else {
                match Type::named(&first) {
                    Some(ty) => Some(ty),
                    None => {
                        return refuse(
                            position,
                            format!(
                                "locals of type `{first}` are not supported: use var, string, int, long, bool, double or object"
                            ),
                        );
                    }
                }
            };
            let (name, name_position) = self.ident("a variable name")?;
            if self.locals.find(&name).is_some() || name == "context" {
                return refuse(name_position, format!("`{name}` is already declared: choose another name"));
            }
            let value = if self.eat_punct("=") {
                self.expression()?
            } else if let Some(ty) = ty {
                Expr::Literal(Value::default_of(ty))
            } else {
                return refuse(name_position, "`var` needs an initial value: `var name = value;`");
            };
            if self.at_punct(",") {
                return refuse(self.position(), "declare one variable per statement");
            }
            self.expect_punct(";", "after the declaration")?;
            let slot = self.locals.count;
            self.locals.count += 1;
            if let Some(scope) = self.locals.scopes.last_mut() {
                scope.push((name, slot));
            }
            out.push(Stmt::Assign(slot, value));
            return Ok(());
        }
        if let Some(Tok::Punct(op @ ("+=" | "-=" | "*=" | "/=" | "%=" | "??=" | "++" | "--"))) = self.peek_tok(0) {
            return refuse(self.position(), format!("`{op}` is not supported: write `name = name ... value;`"));
        }
        if self.at_punct("=") {
            let Some(slot) = self.locals.find(&first) else {
                return refuse(position, format!("only local variables can be assigned, and `{first}` is not one"));
            };
            self.next += 1;
            let value = self.expression()?;
            self.expect_punct(";", "after the assignment")?;
            out.push(Stmt::Assign(slot, value));
            return Ok(());
        }
        refuse(position, "a statement here must be a declaration, an assignment to a local, `if` or `return`")
    }

    // ---- expressions ----

    fn expression(&mut self) -> Result<Expr, CompileError> {
        let position = self.position();
        let e = self.nested(Self::conditional)?;
        if e.deeper_than(MAX_TREE_DEPTH) {
            return refuse(
                position,
                format!("this expression is more than {MAX_TREE_DEPTH} operations deep: split it"),
            );
        }
        Ok(e)
    }

    fn conditional(&mut self) -> Result<Expr, CompileError> {
        let condition = self.coalesce()?;
        let position = self.position();
        if !self.eat_punct("?") {
            return Ok(condition);
        }
        let then = self.expression()?;
        self.expect_punct(":", "between the branches of `?:`")?;
        let otherwise = self.expression()?;
        Ok(Expr::Conditional {
            condition: Box::new(condition),
            then: Box::new(then),
            otherwise: Box::new(otherwise),
            position,
        })
    }

    fn coalesce(&mut self) -> Result<Expr, CompileError> {
        let left = self.or()?;
        if !self.eat_punct("??") {
            return Ok(left);
        }
        let right = self.nested(Self::coalesce)?;
        Ok(Expr::Coalesce(Box::new(left), Box::new(right)))
    }

    fn or(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.and()?;
        loop {
            let position = self.position();
            if !self.eat_punct("||") {
                return Ok(left);
            }
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right), position);
        }
    }

    fn and(&mut self) -> Result<Expr, CompileError> {
        let mut left = self.binary(0)?;
        loop {
            let position = self.position();
            if !self.eat_punct("&&") {
                return Ok(left);
            }
            let right = self.binary(0)?;
            left = Expr::And(Box::new(left), Box::new(right), position);
        }
    }

    /// Left-associative binary operators by precedence level: equality, relational, additive,
    /// multiplicative.
    fn binary(&mut self, level: usize) -> Result<Expr, CompileError> {
        const LEVELS: [&[(&str, BinaryOp)]; 4] = [
            &[("==", BinaryOp::Eq), ("!=", BinaryOp::Ne)],
            &[("<=", BinaryOp::Le), (">=", BinaryOp::Ge), ("<", BinaryOp::Lt), (">", BinaryOp::Gt)],
            &[("+", BinaryOp::Add), ("-", BinaryOp::Sub)],
            &[("*", BinaryOp::Mul), ("/", BinaryOp::Div), ("%", BinaryOp::Rem)],
        ];
        let operand = |p: &mut Self| if level + 1 < LEVELS.len() { p.binary(level + 1) } else { p.unary() };
        let mut left = operand(self)?;
        loop {
            let position = self.position();
            if level == 1 && (self.at_ident("is") || self.at_ident("as")) {
                let word = describe(self.peek_tok(0).unwrap_or(&Tok::Punct("is")));
                return refuse(position, format!("{word} is not supported: compare with `==` or cast instead"));
            }
            let Some(op) = LEVELS[level].iter().find(|(p, _)| self.at_punct(p)).map(|(_, op)| *op) else {
                return Ok(left);
            };
            self.next += 1;
            let right = operand(self)?;
            left = Expr::Binary { op, left: Box::new(left), right: Box::new(right), position };
        }
    }

    fn unary(&mut self) -> Result<Expr, CompileError> {
        let Some(token) = self.peek() else { return refuse(self.end, "expected a value at the end of the expression") };
        let position = token.position;
        match &token.tok {
            Tok::Punct("!") => {
                self.next += 1;
                let operand = self.nested(Self::unary)?;
                Ok(Expr::Not(Box::new(operand), position))
            }
            Tok::Punct("-") => {
                self.next += 1;
                let operand = self.nested(Self::unary)?;
                Ok(Expr::Negate(Box::new(operand), position))
            }
            Tok::Punct(op @ ("++" | "--" | "~" | "&" | "*" | "^")) => {
                refuse(position, format!("the `{op}` operator is not supported in policy expressions"))
            }
            Tok::Punct("(") if self.is_cast() => {
                let Some(Tok::Ident(name)) = self.peek_tok(1) else { return refuse(position, "expected a type") };
                let Some(ty) = Type::named(name).filter(|t| *t != Type::Object) else {
                    return refuse(
                        position,
                        format!(
                            "casting to `{name}` is not supported: policy expressions cast to string, int, long, bool or double"
                        ),
                    );
                };
                self.next += 3;
                let value = self.nested(Self::unary)?;
                Ok(Expr::Cast { ty, value: Box::new(value), position })
            }
            _ => self.postfix(),
        }
    }

    /// `(Name)` followed by something that starts an operand is a cast, as in C#.
    fn is_cast(&self) -> bool {
        let (Some(Tok::Ident(_)), Some(Tok::Punct(")"))) = (self.peek_tok(1), self.peek_tok(2)) else { return false };
        matches!(
            self.peek_tok(3),
            Some(Tok::Ident(_) | Tok::Int(_) | Tok::Double(_) | Tok::Str(_) | Tok::Char(_) | Tok::Interpolated(_))
                | Some(Tok::Punct("(" | "!"))
        )
    }

    fn postfix(&mut self) -> Result<Expr, CompileError> {
        let root = self.primary()?;
        let mut ops = Vec::new();
        loop {
            let position = self.position();
            if self.at_punct(".") || self.at_punct("?.") {
                let null_conditional = self.at_punct("?.");
                self.next += 1;
                let (name, position) = self.ident("a member name after `.`")?;
                let call = self.call()?;
                ops.push(Op::Member { name, null_conditional, position, call });
            } else if self.at_punct("[") || self.at_punct("?[") {
                let null_conditional = self.at_punct("?[");
                self.next += 1;
                let index = self.expression()?;
                if self.at_punct(",") {
                    return refuse(self.position(), "indexing takes one value");
                }
                self.expect_punct("]", "after the index")?;
                ops.push(Op::Index { index, null_conditional, position });
            } else if self.at_punct("(") {
                return refuse(position, "only methods can be called here: `name(...)` alone is not supported");
            } else {
                break;
            }
        }
        lower(root, ops, self.locals)
    }

    /// After a member name: `<Type>(args)`, `(args)` or nothing.
    fn call(&mut self) -> Result<Option<Call>, CompileError> {
        let generic = match (self.peek_tok(0), self.peek_tok(1), self.peek_tok(2), self.peek_tok(3)) {
            (Some(Tok::Punct("<")), Some(Tok::Ident(ty)), Some(Tok::Punct(">")), Some(Tok::Punct("("))) => {
                let position = self.tokens[self.next + 1].position;
                self.next += 3;
                Some((ty.clone(), position))
            }
            _ => None,
        };
        if !self.eat_punct("(") {
            return Ok(None);
        }
        let mut args = Vec::new();
        if !self.eat_punct(")") {
            loop {
                let position = self.position();
                let name = match (self.peek_tok(0), self.peek_tok(1)) {
                    (Some(Tok::Ident(name)), Some(Tok::Punct(":"))) => {
                        self.next += 2;
                        Some(name.clone())
                    }
                    _ => None,
                };
                let value = match self.string_comparison()? {
                    Some(ignore_case) => ArgValue::Comparison { ignore_case },
                    None => ArgValue::Expr(self.expression()?),
                };
                args.push(Arg { name, value, position });
                if self.eat_punct(")") {
                    break;
                }
                self.expect_punct(",", "or `)` after an argument")?;
            }
        }
        Ok(Some(Call { generic, args }))
    }

    /// `StringComparison.X` as a whole argument: whether it ignores case.
    fn string_comparison(&mut self) -> Result<Option<bool>, CompileError> {
        let (Some(Tok::Ident(ty)), Some(Tok::Punct(".")), Some(Tok::Ident(kind)), Some(Tok::Punct(")" | ","))) =
            (self.peek_tok(0), self.peek_tok(1), self.peek_tok(2), self.peek_tok(3))
        else {
            return Ok(None);
        };
        if ty != "StringComparison" {
            return Ok(None);
        }
        let ignore_case = match kind.as_str() {
            "Ordinal" | "InvariantCulture" | "CurrentCulture" => false,
            "OrdinalIgnoreCase" | "InvariantCultureIgnoreCase" | "CurrentCultureIgnoreCase" => true,
            _ => {
                return refuse(
                    self.tokens[self.next + 2].position,
                    format!("`StringComparison.{kind}` is not a string comparison"),
                );
            }
        };
        self.next += 3;
        Ok(Some(ignore_case))
    }

    fn primary(&mut self) -> Result<Chain, CompileError> {
        let Some(token) = self.peek() else { return refuse(self.end, "expected a value at the end of the expression") };
        let position = token.position;
        self.next += 1;
        let literal = |v: Value| Ok(Chain::Value(Expr::Literal(v)));
        match &token.tok {
            Tok::Int(n) => literal(Value::Int(*n)),
            Tok::Double(n) => literal(Value::Double(*n)),
            Tok::Str(s) => literal(Value::Str(s.clone())),
            Tok::Char(c) => literal(Value::Str(c.to_string())),
            Tok::Interpolated(parts) => self.interpolated(parts).map(Chain::Value),
            Tok::Punct("(") => {
                let e = self.expression()?;
                self.expect_punct(")", "to close `(`")?;
                Ok(Chain::Value(e))
            }
            Tok::Ident(name) => match name.as_str() {
                "true" => literal(Value::Bool(true)),
                "false" => literal(Value::Bool(false)),
                "null" => literal(Value::Null),
                "new" => refuse(position, "`new` (creating objects) is not supported in policy expressions"),
                "typeof" | "default" | "nameof" | "sizeof" | "checked" | "unchecked" | "await" | "this" | "base"
                | "throw" | "stackalloc" | "delegate" => {
                    refuse(position, format!("`{name}` is not supported in policy expressions"))
                }
                _ => {
                    if matches!(self.peek_tok(0), Some(Tok::Punct("=>"))) {
                        return refuse(position, "lambdas (`=>`) are not supported in policy expressions");
                    }
                    Ok(Chain::Path(vec![name.clone()], position))
                }
            },
            other => refuse(position, format!("{} is not supported here: expected a value", describe(other))),
        }
    }

    fn interpolated(&mut self, parts: &[Part]) -> Result<Expr, CompileError> {
        let mut segments = Vec::with_capacity(parts.len());
        for part in parts {
            match part {
                Part::Text(text) => segments.push(Segment::Text(text.clone())),
                Part::Hole { position, suffix: Some(suffix), .. } => {
                    return refuse(
                        *position,
                        format!(
                            "format and alignment in interpolation holes (`{suffix}`) are not supported: call a method instead"
                        ),
                    );
                }
                Part::Hole { tokens, position, suffix: None } => {
                    if tokens.is_empty() {
                        return refuse(*position, "an interpolation hole `{}` needs an expression");
                    }
                    let end = tokens.last().map_or(*position, |t| t.position);
                    let nesting = self.nesting + 1;
                    let mut hole = Parser { tokens, next: 0, end, locals: &mut *self.locals, nesting };
                    let e = hole.expression()?;
                    hole.expect_end()?;
                    segments.push(Segment::Expr(e));
                }
            }
        }
        Ok(Expr::Interpolated(segments))
    }
}

fn secret_refusal<T>(position: Position, what: &str) -> Result<T, CompileError> {
    refuse(
        position,
        format!("policy expressions cannot read {what}: it carries a subscription key or a backend secret"),
    )
}

/// Resolves a member chain (`context.Request.Headers.GetValueOrDefault("x")`, `s.ToLower()`).
fn lower(root: Chain, ops: Vec<Op>, locals: &Locals) -> Result<Expr, CompileError> {
    let mut chain = match root {
        Chain::Path(path, position) => match locals.find(&path[0]) {
            Some(slot) => Chain::Value(Expr::Local(slot)),
            None if ["context", "string", "String", "int", "Int32", "long", "Int64"].contains(&path[0].as_str()) => {
                Chain::Path(path, position)
            }
            None => {
                return refuse(
                    position,
                    format!(
                        "`{}` is not supported in policy expressions (only `context`, `string`, `int` and local variables are)",
                        path[0]
                    ),
                );
            }
        },
        value => value,
    };
    let mut null_conditional_seen = false;
    for op in ops {
        null_conditional_seen |=
            matches!(op, Op::Member { null_conditional: true, .. } | Op::Index { null_conditional: true, .. });
        chain = match chain {
            Chain::Path(path, _) => lower_path(path, op)?,
            Chain::Value(receiver) => Chain::Value(lower_on_value(receiver, op)?),
        };
    }
    match chain {
        Chain::Path(path, position) => {
            refuse(position, format!("`{}` is not a value: use one of its supported members", path.join(".")))
        }
        Chain::Value(e) if null_conditional_seen => Ok(Expr::NullConditional(Box::new(e))),
        Chain::Value(e) => Ok(e),
    }
}

fn path_str(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

/// An op applied to a static path such as `context.Request`.
fn lower_path(mut path: Vec<String>, op: Op) -> Result<Chain, CompileError> {
    let (name, null_conditional, position, call) = match op {
        Op::Index { index, position, .. } => {
            return match path_str(&path).as_slice() {
                ["context", "Variables"] => Ok(Chain::Value(Expr::Variable { name: Box::new(index), position })),
                ["context", "Request", "Headers"] => refuse(
                    position,
                    "indexing context.Request.Headers is not supported: use context.Request.Headers.GetValueOrDefault(name, default)",
                ),
                _ => refuse(position, format!("`{}` cannot be indexed in policy expressions", path.join("."))),
            };
        }
        Op::Member { name, null_conditional, position, call } => (name, null_conditional, position, call),
    };
    path.push(name);
    let p = path_str(&path);
    let Some(call) = call else {
        let field = match p.as_slice() {
            ["context", "Subscription", "Id" | "Name"] => {
                return Ok(Chain::Value(Expr::Subscription { name: p[2] == "Name", null_conditional, position }));
            }
            ["context", "Subscription", "Key" | "PrimaryKey" | "SecondaryKey"] => {
                return secret_refusal(position, &format!("context.Subscription.{}", p[2]));
            }
            ["context", "Response", "StatusCode"] => {
                return Ok(Chain::Value(Expr::ResponseStatus { null_conditional, position }));
            }
            ["string" | "String", "Empty"] => return Ok(Chain::Value(Expr::Literal(Value::Str(String::new())))),
            ["context", "Api", "Id"] => ContextField::ApiId,
            ["context", "Api", "Name"] => ContextField::ApiName,
            ["context", "Operation", "Id"] => ContextField::OperationId,
            ["context", "Operation", "Name"] => ContextField::OperationName,
            ["context", "Request", "IpAddress"] => ContextField::IpAddress,
            ["context", "Deployment", "Region"] => ContextField::Region,
            ["context", "Subscription" | "Api" | "Operation" | "Request" | "Response" | "Deployment" | "Variables"]
            | ["context", "Request", "Headers" | "Url" | "Body"]
            | ["context", "Request", "Url", "Query"] => return Ok(Chain::Path(path, position)),
            _ => return refuse(position, format!("`{}` is not supported in policy expressions", path.join("."))),
        };
        return Ok(Chain::Value(Expr::Context(field)));
    };
    let what = path.join(".");
    let Call { generic, args } = call;
    let expr = match p.as_slice() {
        ["context", "Request", "Body", "As"] => {
            match &generic {
                Some((ty, _)) if ty == "JObject" => {}
                Some((ty, position)) => {
                    return refuse(
                        *position,
                        format!("`Body.As<{ty}>` is not supported: policy expressions read the body as JObject"),
                    );
                }
                None => return refuse(position, "`Body.As` needs a type: `Body.As<JObject>(preserveContent: true)`"),
            }
            match args.as_slice() {
                [] => {}
                [Arg { name, value: ArgValue::Expr(Expr::Literal(Value::Bool(_))), .. }]
                    if name.as_deref().is_none_or(|n| n == "preserveContent") => {}
                [arg, ..] => {
                    return refuse(arg.position, "`Body.As<JObject>` takes only `preserveContent: true` or `false`");
                }
            }
            Expr::Body
        }
        ["context", "Request", "Headers", "GetValueOrDefault"] => {
            lookup(RequestPart::Header, generic, args, &what, position)?
        }
        ["context", "Request", "Url", "Query", "GetValueOrDefault"] => {
            lookup(RequestPart::Query, generic, args, &what, position)?
        }
        ["context", "Variables", "GetValueOrDefault"] => {
            let ty = match &generic {
                None => None,
                Some((name, position)) => match Type::named(name) {
                    Some(ty) => Some(ty),
                    None => {
                        return refuse(
                            *position,
                            format!(
                                "`GetValueOrDefault<{name}>` is not supported: use string, int, long, bool, double or object"
                            ),
                        );
                    }
                },
            };
            let (name, default) = name_and_default(args, &what, position)?;
            Expr::VariableOrDefault { name: Box::new(name), ty, default, position }
        }
        ["context", "Variables", "ContainsKey"] => {
            no_generic(&generic, &what)?;
            let [name] = plain_args::<1>(args, &what, position)?;
            Expr::VariableExists { name: Box::new(name), position }
        }
        ["string" | "String", method @ ("IsNullOrEmpty" | "IsNullOrWhiteSpace")] => {
            no_generic(&generic, &what)?;
            let [value] = plain_args::<1>(args, &what, position)?;
            Expr::IsNullOrEmpty { value: Box::new(value), whitespace: *method == "IsNullOrWhiteSpace", position }
        }
        ["string" | "String", "Format"] => {
            no_generic(&generic, &what)?;
            let mut args = unnamed(args, &what)?.into_iter();
            let Some(format) = args.next() else { return refuse(position, "`string.Format` needs a format string") };
            Expr::Format { format: Box::new(format), args: args.collect(), position }
        }
        ["int" | "Int32" | "long" | "Int64", "Parse"] => {
            no_generic(&generic, &what)?;
            let [value] = plain_args::<1>(args, &what, position)?;
            Expr::IntParse(Box::new(value), position)
        }
        _ => return refuse(position, format!("`{what}(...)` is not supported in policy expressions")),
    };
    Ok(Chain::Value(expr))
}

/// An op applied to a value: a method, `.Length`, or an index.
fn lower_on_value(receiver: Expr, op: Op) -> Result<Expr, CompileError> {
    let receiver = Box::new(receiver);
    let (name, null_conditional, position, call) = match op {
        Op::Index { index, null_conditional, position } => {
            return Ok(Expr::Index { receiver, index: Box::new(index), null_conditional, position });
        }
        Op::Member { name, null_conditional, position, call } => (name, null_conditional, position, call),
    };
    let Some(Call { generic, mut args }) = call else {
        return match name.as_str() {
            "Length" | "Count" => Ok(Expr::Length { receiver, null_conditional, position }),
            _ => refuse(position, format!("`.{name}` is not supported in policy expressions (values have `.Length`)")),
        };
    };
    let what = format!(".{name}");
    let (method, arity) = match name.as_str() {
        "ToString" => (Method::ToString, 0),
        "ToLower" | "ToLowerInvariant" => (Method::ToLower, 0),
        "ToUpper" | "ToUpperInvariant" => (Method::ToUpper, 0),
        "Trim" => (Method::Trim, 0),
        "Contains" | "StartsWith" | "EndsWith" | "Equals" => {
            let ignore_case = match args.last() {
                Some(Arg { value: ArgValue::Comparison { ignore_case }, name: None, .. }) => {
                    let ignore_case = *ignore_case;
                    args.pop();
                    ignore_case
                }
                _ => false,
            };
            let method = match name.as_str() {
                "Contains" => Method::Contains(ignore_case),
                "StartsWith" => Method::StartsWith(ignore_case),
                "EndsWith" => Method::EndsWith(ignore_case),
                _ => Method::Equals(ignore_case),
            };
            (method, 1)
        }
        "Split" => (Method::Split, usize::MAX),
        "Value" => match &generic {
            Some((ty, ty_position)) => match Type::named(ty) {
                Some(ty) => (Method::JsonValue(ty), 1),
                None => {
                    return refuse(
                        *ty_position,
                        format!("`Value<{ty}>` is not supported: use string, int, long, bool or double"),
                    );
                }
            },
            None => return refuse(position, "`.Value` needs a type: `.Value<string>(\"name\")`"),
        },
        _ => return refuse(position, format!("`{what}(...)` is not supported in policy expressions")),
    };
    if !matches!(method, Method::JsonValue(_)) {
        no_generic(&generic, &what)?;
    }
    let args = unnamed(args, &what)?;
    if method == Method::Split && args.is_empty() {
        return refuse(position, "`.Split` needs the separator(s)");
    }
    if arity != usize::MAX && args.len() != arity {
        return refuse(position, format!("`{what}` takes {arity} argument(s) here, not {}", args.len()));
    }
    Ok(Expr::Method { receiver, method, args, null_conditional, position })
}

/// `context.Request.Headers.GetValueOrDefault(...)` or its query twin; a literal key name is refused.
fn lookup(
    part: RequestPart,
    generic: Option<(String, Position)>,
    args: Vec<Arg>,
    what: &str,
    position: Position,
) -> Result<Expr, CompileError> {
    no_generic(&generic, what)?;
    let (name, default) = name_and_default(args, what, position)?;
    if let Expr::Literal(Value::Str(key)) = &name
        && part.is_secret(key)
    {
        return secret_refusal(position, &format!("the `{key}` {}", part.noun()));
    }
    Ok(Expr::Lookup { part, name: Box::new(name), default, position })
}

fn no_generic(generic: &Option<(String, Position)>, what: &str) -> Result<(), CompileError> {
    match generic {
        Some((ty, position)) => {
            refuse(*position, format!("`{what}<{ty}>` is not supported: `{what}` takes no type argument"))
        }
        None => Ok(()),
    }
}

fn unnamed(args: Vec<Arg>, what: &str) -> Result<Vec<Expr>, CompileError> {
    args.into_iter()
        .map(|a| match (a.name, a.value) {
            (Some(name), _) => refuse(a.position, format!("the named argument `{name}:` is not supported for `{what}`")),
            (None, ArgValue::Comparison { .. }) => refuse(
                a.position,
                format!("a StringComparison argument is not supported for `{what}`: only the last argument of .Equals, .StartsWith, .EndsWith and .Contains takes one"),
            ),
            (None, ArgValue::Expr(value)) => Ok(value),
        })
        .collect()
}

fn plain_args<const N: usize>(args: Vec<Arg>, what: &str, position: Position) -> Result<[Expr; N], CompileError> {
    let args = unnamed(args, what)?;
    let count = args.len();
    args.try_into().or_else(|_| refuse(position, format!("`{what}` takes {N} argument(s), not {count}")))
}

/// `(name)` or `(name, default)`.
fn name_and_default(args: Vec<Arg>, what: &str, position: Position) -> Result<(Expr, Option<Box<Expr>>), CompileError> {
    let mut args = unnamed(args, what)?.into_iter();
    match (args.next(), args.next(), args.next()) {
        (Some(name), default, None) => Ok((name, default.map(Box::new))),
        _ => refuse(position, format!("`{what}` takes a name and optionally a default value")),
    }
}
