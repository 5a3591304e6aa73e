//! Evaluates compiled policy expressions per request against [`RequestContext`].
//!
//! Semantics follow C# where the subset reaches: `null` concatenates as empty text, a member of
//! `null` is an error unless reached through `?.`/`?[` (which makes the whole chain `null`),
//! `context.Variables["x"]` of an unset variable is an error while `GetValueOrDefault` is not,
//! and integer division by zero is an error. Runtime errors carry the line and column of the
//! operation that failed.

use std::fmt;
use std::sync::Arc;

use crate::Position;
use crate::expression::{BinaryOp, Body, Expr, Method, Program, Segment, Stmt, Type};

/// Headers that carry subscription keys, backend credentials or sessions (the same set the
/// gateway's templates refuse). Expressions never see them: a literal name is refused at compile
/// time, a computed one reads as absent.
const SECRET_HEADERS: &[&str] =
    &["Ocp-Apim-Subscription-Key", "api-key", "x-api-key", "Authorization", "Proxy-Authorization", "Cookie"];
/// Query parameters that carry subscription keys, treated like [`SECRET_HEADERS`].
const SECRET_QUERY_PARAMETERS: &[&str] = &["subscription-key", "api-key"];

/// Whether a request header carries a subscription key or a credential (case-insensitive).
pub fn is_secret_header(name: &str) -> bool {
    SECRET_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a query parameter carries a subscription key (case-insensitive).
pub fn is_secret_query_parameter(name: &str) -> bool {
    SECRET_QUERY_PARAMETERS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// What policy expressions can see of a request; the gateway implements it.
///
/// There is deliberately no way to reach a subscription key or a backend secret through it:
/// no subscription key property exists (`context.Subscription.Key`, `.PrimaryKey` and
/// `.SecondaryKey` are refused at compile time), and [`RequestContext::request_header`] and
/// [`RequestContext::query_parameter`] are never called with a name for which
/// [`is_secret_header`] or [`is_secret_query_parameter`] holds. Implementations need not filter
/// again, but must not put secrets in variables either.
pub trait RequestContext {
    /// `None` when the request has no subscription (`context.Subscription` is null).
    fn subscription_id(&self) -> Option<&str>;
    fn subscription_name(&self) -> Option<&str>;
    fn api_id(&self) -> &str;
    fn api_name(&self) -> &str;
    fn operation_id(&self) -> &str;
    fn operation_name(&self) -> &str;
    fn client_ip(&self) -> &str;
    /// A request header, several values joined with `,` as API Management does.
    fn request_header(&self, name: &str) -> Option<String>;
    fn query_parameter(&self, name: &str) -> Option<String>;
    fn variable(&self, name: &str) -> Option<Value>;
    /// For the gateway's `set-variable`; expressions themselves never assign variables.
    fn set_variable(&mut self, name: &str, value: Value);
    /// `None` until the backend has answered (`context.Response` is null).
    fn response_status(&self) -> Option<u16>;
    fn region(&self) -> &str;
    /// The request body as JSON; `None` when there is none or it is not JSON.
    fn request_body_json(&self) -> Option<Arc<serde_json::Value>>;
}

/// The parts of a request that `GetValueOrDefault(name, default)` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestPart {
    Header,
    Query,
}

impl RequestPart {
    pub(crate) fn is_secret(self, name: &str) -> bool {
        match self {
            RequestPart::Header => is_secret_header(name),
            RequestPart::Query => is_secret_query_parameter(name),
        }
    }

    pub(crate) fn noun(self) -> &'static str {
        match self {
            RequestPart::Header => "header",
            RequestPart::Query => "query parameter",
        }
    }

    /// The value, or `None` when it is absent or secret: a secret reads as absent.
    fn read(self, context: &dyn RequestContext, name: &str) -> Option<String> {
        if self.is_secret(name) {
            return None;
        }
        match self {
            RequestPart::Header => context.request_header(name),
            RequestPart::Query => context.query_parameter(name),
        }
    }
}

/// `context` members that are plain text and never null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextField {
    ApiId,
    ApiName,
    OperationId,
    OperationName,
    IpAddress,
    Region,
}

/// A value of a policy expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(String),
    /// A `string[]` from `.Split`.
    Strings(Vec<String>),
    /// A JSON token (`JObject`, `JArray`, `JValue`) from the request body.
    Json(JsonToken),
}

/// A JSON token inside a shared document, kept as the document and the path to the token, so
/// that `body["messages"][0]` on a large request body copies nothing.
#[derive(Debug, Clone)]
pub struct JsonToken {
    root: Arc<serde_json::Value>,
    path: Vec<JsonKey>,
}

#[derive(Debug, Clone)]
enum JsonKey {
    Name(String),
    Index(usize),
}

impl JsonToken {
    pub fn new(root: Arc<serde_json::Value>) -> Self {
        JsonToken { root, path: Vec::new() }
    }

    /// The child at `key`; only called for a child that exists.
    fn child(&self, key: JsonKey) -> JsonToken {
        let mut path = self.path.clone();
        path.push(key);
        JsonToken { root: Arc::clone(&self.root), path }
    }
}

impl std::ops::Deref for JsonToken {
    type Target = serde_json::Value;

    fn deref(&self) -> &serde_json::Value {
        self.path.iter().fold(&*self.root, |value, key| match key {
            JsonKey::Name(name) => &value[name.as_str()],
            JsonKey::Index(i) => &value[*i],
        })
    }
}

impl PartialEq for JsonToken {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Value {
    pub(crate) fn default_of(ty: Type) -> Value {
        match ty {
            Type::String | Type::Object => Value::Null,
            Type::Int => Value::Int(0),
            Type::Bool => Value::Bool(false),
            Type::Double => Value::Double(0.0),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Double(_) => "a double",
            Value::Str(_) => "a string",
            Value::Strings(_) => "a string array",
            Value::Json(j) => match **j {
                serde_json::Value::Object(_) => "a JSON object",
                serde_json::Value::Array(_) => "a JSON array",
                _ => "a JSON value",
            },
        }
    }

    /// A JSON scalar as the plain value it holds; anything else unchanged.
    fn scalar(self) -> Value {
        let Value::Json(json) = &self else { return self };
        match &**json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Number(n) => {
                n.as_i64().map_or_else(|| Value::Double(n.as_f64().unwrap_or(0.0)), Value::Int)
            }
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => self,
        }
    }
}

/// As C#'s `ToString()` writes it (`True`/`False` for bools, indented JSON for objects);
/// null is empty, as in string concatenation.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Bool(true) => f.write_str("True"),
            Value::Bool(false) => f.write_str("False"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Double(n) => write!(f, "{n}"),
            Value::Str(s) => f.write_str(s),
            Value::Strings(_) => f.write_str("System.String[]"),
            Value::Json(json) => match &**json {
                serde_json::Value::String(s) => f.write_str(s),
                serde_json::Value::Null => Ok(()),
                serde_json::Value::Bool(b) => Value::Bool(*b).fmt(f),
                serde_json::Value::Number(n) => write!(f, "{n}"),
                other => f.write_str(&serde_json::to_string_pretty(other).map_err(|_| fmt::Error)?),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    pub position: Position,
    pub message: String,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.position, self.message)
    }
}

impl std::error::Error for EvalError {}

/// How evaluation leaves an expression other than with a value.
enum Flow {
    /// A `?.` met null: the enclosing member chain is null.
    ShortCircuit,
    Error(EvalError),
}

type Eval<T = Value> = Result<T, Flow>;

fn fail<T>(position: Position, message: impl Into<String>) -> Eval<T> {
    Err(Flow::Error(EvalError { position, message: message.into() }))
}

impl Program {
    /// Evaluates the program for one request.
    pub fn evaluate(&self, context: &dyn RequestContext) -> Result<Value, EvalError> {
        let mut evaluator = Evaluator { context, locals: vec![Value::Null; self.locals] };
        let result = match &self.body {
            Body::Expression(e) => evaluator.expr(e),
            Body::Block(statements) => match evaluator.block(statements) {
                Ok(Some(value)) => Ok(value),
                Ok(None) => fail(self.position, "the block ended without returning a value"),
                Err(flow) => Err(flow),
            },
        };
        match result {
            Ok(value) => Ok(value),
            Err(Flow::ShortCircuit) => Ok(Value::Null),
            Err(Flow::Error(e)) => Err(e),
        }
    }
}

struct Evaluator<'c> {
    context: &'c dyn RequestContext,
    locals: Vec<Value>,
}

fn null_receiver<T>(null_conditional: bool, position: Position, what: &str) -> Eval<T> {
    if null_conditional {
        Err(Flow::ShortCircuit)
    } else {
        fail(position, format!("{what} of null (use `?.` where null is expected)"))
    }
}

fn text(value: Value, position: Position, what: &str) -> Eval<String> {
    match value.scalar() {
        Value::Str(s) => Ok(s),
        other => fail(position, format!("{what} needs a string, not {}", other.kind())),
    }
}

fn boolean(value: Value, position: Position, what: &str) -> Eval<bool> {
    match value.scalar() {
        Value::Bool(b) => Ok(b),
        other => fail(position, format!("{what} needs a bool, not {}", other.kind())),
    }
}

/// C# length: UTF-16 code units.
fn utf16_len(s: &str) -> i64 {
    s.encode_utf16().count() as i64
}

fn cast(ty: Type, value: Value, position: Position) -> Eval {
    let json_text = matches!(&value, Value::Json(j) if !j.is_object() && !j.is_array());
    let value = value.scalar();
    let refused = |v: &Value| fail(position, format!("{} cannot be cast to {}", v.kind(), type_name(ty)));
    Ok(match (ty, value) {
        (Type::Object, v) => v,
        (Type::String, v @ (Value::Null | Value::Str(_))) => v,
        // A JSON number or bool converts to its text, as Newtonsoft's explicit conversion does.
        (Type::String, v @ (Value::Int(_) | Value::Double(_) | Value::Bool(_))) if json_text => {
            Value::Str(v.to_string())
        }
        (Type::Int, Value::Int(n)) => Value::Int(n),
        (Type::Int, Value::Double(n)) => Value::Int(n as i64),
        (Type::Int, Value::Str(s)) if json_text => Value::Int(parse_int(&s, position)?),
        (Type::Double, Value::Int(n)) => Value::Double(n as f64),
        (Type::Double, Value::Double(n)) => Value::Double(n),
        (Type::Bool, Value::Bool(b)) => Value::Bool(b),
        (Type::Bool, Value::Str(s))
            if json_text && (s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false")) =>
        {
            Value::Bool(s.eq_ignore_ascii_case("true"))
        }
        (_, v) => return refused(&v),
    })
}

fn type_name(ty: Type) -> &'static str {
    match ty {
        Type::String => "string",
        Type::Int => "int",
        Type::Bool => "bool",
        Type::Double => "double",
        Type::Object => "object",
    }
}

/// `int.Parse`: optional sign, surrounding whitespace, 32-bit range.
fn parse_int(s: &str, position: Position) -> Eval<i64> {
    match s.trim().parse::<i32>() {
        Ok(n) => Ok(i64::from(n)),
        Err(_) => fail(position, format!("`{}` is not an int", s.chars().take(64).collect::<String>())),
    }
}

fn equal(a: Value, b: Value) -> bool {
    match (a.scalar(), b.scalar()) {
        (Value::Int(x), Value::Double(y)) | (Value::Double(y), Value::Int(x)) => (x as f64) == y,
        (x, y) => x == y,
    }
}

fn number(v: Value) -> Option<f64> {
    match v {
        Value::Int(n) => Some(n as f64),
        Value::Double(n) => Some(n),
        _ => None,
    }
}

fn arithmetic(op: BinaryOp, a: Value, b: Value, position: Position) -> Eval {
    let (a, b) = (a.scalar(), b.scalar());
    if op == BinaryOp::Add && (matches!(a, Value::Str(_)) || matches!(b, Value::Str(_))) {
        return Ok(Value::Str(format!("{a}{b}")));
    }
    if matches!(a, Value::Null) || matches!(b, Value::Null) {
        // C#'s lifted operators: arithmetic with null is null.
        return Ok(Value::Null);
    }
    if let (Value::Int(x), Value::Int(y)) = (&a, &b) {
        let (x, y) = (*x, *y);
        return Ok(Value::Int(match op {
            BinaryOp::Add => x.wrapping_add(y),
            BinaryOp::Sub => x.wrapping_sub(y),
            BinaryOp::Mul => x.wrapping_mul(y),
            BinaryOp::Div | BinaryOp::Rem if y == 0 => return fail(position, "division by zero"),
            BinaryOp::Div => x.wrapping_div(y),
            _ => x.wrapping_rem(y),
        }));
    }
    let (Some(x), Some(y)) = (number(a.clone()), number(b.clone())) else {
        return fail(position, format!("this operator does not apply to {} and {}", a.kind(), b.kind()));
    };
    Ok(Value::Double(match op {
        BinaryOp::Add => x + y,
        BinaryOp::Sub => x - y,
        BinaryOp::Mul => x * y,
        BinaryOp::Div => x / y,
        _ => x % y,
    }))
}

fn compare(op: BinaryOp, a: Value, b: Value, position: Position) -> Eval {
    let (a, b) = (a.scalar(), b.scalar());
    if matches!(a, Value::Null) || matches!(b, Value::Null) {
        return Ok(Value::Bool(false));
    }
    let (Some(x), Some(y)) = (number(a.clone()), number(b.clone())) else {
        return fail(position, format!("`<`, `>`, `<=` and `>=` compare numbers, not {} and {}", a.kind(), b.kind()));
    };
    Ok(Value::Bool(match op {
        BinaryOp::Lt => x < y,
        BinaryOp::Gt => x > y,
        BinaryOp::Le => x <= y,
        _ => x >= y,
    }))
}

/// `string.Format` with `{0}`-style holes and `{{`/`}}` escapes.
fn format(template: &str, args: &[Value], position: Position) -> Eval {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut index = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(d) if d.is_ascii_digit() && index.len() < 4 => index.push(d),
                        _ => {
                            return fail(
                                position,
                                "string.Format supports `{0}`-style holes without format or alignment",
                            );
                        }
                    }
                }
                let Some(arg) = index.parse::<usize>().ok().and_then(|i| args.get(i)) else {
                    return fail(position, format!("string.Format hole `{{{index}}}` has no matching argument"));
                };
                out.push_str(&arg.to_string());
            }
            '}' => return fail(position, "a lone `}` in a string.Format template must be written `}}`"),
            c => out.push(c),
        }
    }
    Ok(Value::Str(out))
}

fn split(s: &str, separators: &[String]) -> Vec<String> {
    let separators: Vec<&str> = separators.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
    if separators.is_empty() {
        return vec![s.to_owned()];
    }
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        if let Some(sep) = separators.iter().find(|sep| s[i..].starts_with(**sep)) {
            parts.push(s[start..i].to_owned());
            i += sep.len();
            start = i;
        } else {
            i += s[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    parts.push(s[start..].to_owned());
    parts
}

impl Evaluator<'_> {
    fn block(&mut self, statements: &[Stmt]) -> Eval<Option<Value>> {
        for statement in statements {
            match statement {
                Stmt::Assign(slot, e) => {
                    let value = self.expr(e)?;
                    if let Some(local) = self.locals.get_mut(*slot) {
                        *local = value;
                    }
                }
                Stmt::Return(e) => return self.expr(e).map(Some),
                Stmt::If { condition, then, otherwise, position } => {
                    let condition = self.expr(condition)?;
                    let branch = if boolean(condition, *position, "`if`")? { then } else { otherwise };
                    if let Some(value) = self.block(branch)? {
                        return Ok(Some(value));
                    }
                }
            }
        }
        Ok(None)
    }

    fn optional(&mut self, e: &Option<Box<Expr>>) -> Eval {
        e.as_deref().map_or(Ok(Value::Null), |e| self.expr(e))
    }

    fn expr(&mut self, e: &Expr) -> Eval {
        let context = self.context;
        Ok(match e {
            Expr::Literal(v) => v.clone(),
            Expr::Local(slot) => self.locals.get(*slot).cloned().unwrap_or(Value::Null),
            Expr::Interpolated(segments) => {
                let mut out = String::new();
                for segment in segments {
                    match segment {
                        Segment::Text(t) => out.push_str(t),
                        Segment::Expr(e) => out.push_str(&self.expr(e)?.to_string()),
                    }
                }
                Value::Str(out)
            }
            Expr::Subscription { name, null_conditional, position } => {
                let value = if *name { context.subscription_name() } else { context.subscription_id() };
                match value {
                    Some(v) => Value::Str(v.to_owned()),
                    None if context.subscription_id().is_none() => {
                        return null_receiver(
                            *null_conditional,
                            *position,
                            "context.Subscription is null here (the request has no subscription): a member",
                        );
                    }
                    None => Value::Null,
                }
            }
            Expr::Context(field) => Value::Str(
                match field {
                    ContextField::ApiId => context.api_id(),
                    ContextField::ApiName => context.api_name(),
                    ContextField::OperationId => context.operation_id(),
                    ContextField::OperationName => context.operation_name(),
                    ContextField::IpAddress => context.client_ip(),
                    ContextField::Region => context.region(),
                }
                .to_owned(),
            ),
            Expr::ResponseStatus { null_conditional, position } => match context.response_status() {
                Some(status) => Value::Int(i64::from(status)),
                None => {
                    return null_receiver(
                        *null_conditional,
                        *position,
                        "context.Response is null before the backend answers: a member",
                    );
                }
            },
            Expr::Lookup { part, name, default, position } => {
                let name = text(self.expr(name)?, *position, &format!("a {} name", part.noun()))?;
                match part.read(context, &name) {
                    Some(v) => Value::Str(v),
                    None => self.optional(default)?,
                }
            }
            Expr::Variable { name, position } => {
                let name = text(self.expr(name)?, *position, "a variable name")?;
                match context.variable(&name) {
                    Some(v) => v,
                    None => {
                        return fail(
                            *position,
                            format!("variable `{name}` is not set (GetValueOrDefault reads it when it may be missing)"),
                        );
                    }
                }
            }
            Expr::VariableOrDefault { name, ty, default, position } => {
                let name = text(self.expr(name)?, *position, "a variable name")?;
                match (context.variable(&name), ty) {
                    (Some(v), Some(ty)) => cast(*ty, v, *position)?,
                    (Some(v), None) => v,
                    (None, _) if default.is_some() => self.optional(default)?,
                    (None, ty) => Value::default_of(ty.unwrap_or(Type::Object)),
                }
            }
            Expr::VariableExists { name, position } => {
                let name = text(self.expr(name)?, *position, "a variable name")?;
                Value::Bool(context.variable(&name).is_some())
            }
            Expr::Body => context.request_body_json().map_or(Value::Null, |body| Value::Json(JsonToken::new(body))),
            Expr::Not(e, position) => Value::Bool(!boolean(self.expr(e)?, *position, "`!`")?),
            Expr::Negate(e, position) => match self.expr(e)?.scalar() {
                Value::Int(n) => Value::Int(n.wrapping_neg()),
                Value::Double(n) => Value::Double(-n),
                Value::Null => Value::Null,
                other => return fail(*position, format!("`-` needs a number, not {}", other.kind())),
            },
            Expr::Binary { op, left, right, position } => {
                let (a, b) = (self.expr(left)?, self.expr(right)?);
                match op {
                    BinaryOp::Eq => Value::Bool(equal(a, b)),
                    BinaryOp::Ne => Value::Bool(!equal(a, b)),
                    BinaryOp::Lt | BinaryOp::Gt | BinaryOp::Le | BinaryOp::Ge => compare(*op, a, b, *position)?,
                    _ => arithmetic(*op, a, b, *position)?,
                }
            }
            Expr::And(a, b, position) => {
                Value::Bool(boolean(self.expr(a)?, *position, "`&&`")? && boolean(self.expr(b)?, *position, "`&&`")?)
            }
            Expr::Or(a, b, position) => {
                Value::Bool(boolean(self.expr(a)?, *position, "`||`")? || boolean(self.expr(b)?, *position, "`||`")?)
            }
            Expr::Coalesce(a, b) => match self.expr(a)? {
                Value::Null => self.expr(b)?,
                v => v,
            },
            Expr::Conditional { condition, then, otherwise, position } => {
                if boolean(self.expr(condition)?, *position, "`?:`")? {
                    self.expr(then)?
                } else {
                    self.expr(otherwise)?
                }
            }
            Expr::Cast { ty, value, position } => cast(*ty, self.expr(value)?, *position)?,
            Expr::Method { receiver, method, args, null_conditional, position } => {
                let receiver = self.expr(receiver)?;
                if receiver == Value::Null {
                    return null_receiver(*null_conditional, *position, "a method call");
                }
                let mut values = Vec::with_capacity(args.len());
                for arg in args {
                    values.push(self.expr(arg)?);
                }
                self.method(receiver, *method, values, *position)?
            }
            Expr::Index { receiver, index, null_conditional, position } => {
                let receiver = self.expr(receiver)?;
                let index = self.expr(index)?.scalar();
                self.index(receiver, index, *null_conditional, *position)?
            }
            Expr::Length { receiver, null_conditional, position } => match self.expr(receiver)? {
                Value::Null => return null_receiver(*null_conditional, *position, "`.Length`"),
                Value::Str(s) => Value::Int(utf16_len(&s)),
                Value::Strings(parts) => Value::Int(parts.len() as i64),
                Value::Json(json) => match &*json {
                    serde_json::Value::Array(a) => Value::Int(a.len() as i64),
                    serde_json::Value::Object(o) => Value::Int(o.len() as i64),
                    serde_json::Value::String(s) => Value::Int(utf16_len(s)),
                    _ => return fail(*position, "`.Length` needs a string, an array or an object"),
                },
                other => return fail(*position, format!("`.Length` does not apply to {}", other.kind())),
            },
            Expr::IsNullOrEmpty { value, whitespace, position } => match self.expr(value)?.scalar() {
                Value::Null => Value::Bool(true),
                Value::Str(s) => Value::Bool(if *whitespace { s.trim().is_empty() } else { s.is_empty() }),
                other => return fail(*position, format!("string.IsNullOrEmpty needs a string, not {}", other.kind())),
            },
            Expr::Format { format: template, args, position } => {
                let template = text(self.expr(template)?, *position, "string.Format")?;
                let mut values = Vec::with_capacity(args.len());
                for arg in args {
                    values.push(self.expr(arg)?);
                }
                format(&template, &values, *position)?
            }
            Expr::IntParse(value, position) => {
                let s = text(self.expr(value)?, *position, "int.Parse")?;
                Value::Int(parse_int(&s, *position)?)
            }
            Expr::NullConditional(e) => match self.expr(e) {
                Err(Flow::ShortCircuit) => Value::Null,
                other => other?,
            },
        })
    }

    fn index(&mut self, receiver: Value, index: Value, null_conditional: bool, position: Position) -> Eval {
        let out_of_range = |len: usize| fail(position, format!("index {index:?} is outside the {len} items here"));
        Ok(match (receiver, &index) {
            (Value::Null, _) => return null_receiver(null_conditional, position, "indexing"),
            (Value::Json(json), Value::Str(key)) => match json.as_object() {
                // JObject's indexer: a missing property is null.
                Some(object) if object.contains_key(key) => Value::Json(json.child(JsonKey::Name(key.clone()))),
                Some(_) => Value::Null,
                None => return fail(position, "only a JSON object can be indexed by name"),
            },
            (Value::Json(json), Value::Int(i)) => match json.as_array() {
                Some(array) => match usize::try_from(*i).ok().filter(|i| *i < array.len()) {
                    Some(i) => Value::Json(json.child(JsonKey::Index(i))),
                    None => return out_of_range(array.len()),
                },
                None => return fail(position, "only a JSON array can be indexed by number"),
            },
            (Value::Strings(parts), Value::Int(i)) => match usize::try_from(*i).ok().and_then(|i| parts.get(i)) {
                Some(part) => Value::Str(part.clone()),
                None => return out_of_range(parts.len()),
            },
            (receiver, _) => {
                return fail(position, format!("{} cannot be indexed by {}", receiver.kind(), index.kind()));
            }
        })
    }

    fn method(&mut self, receiver: Value, method: Method, args: Vec<Value>, position: Position) -> Eval {
        if let Method::JsonValue(ty) = method {
            let Value::Json(json) = &receiver else {
                return fail(position, format!("`.Value<T>(name)` needs a JSON object, not {}", receiver.kind()));
            };
            let key = text(args.into_iter().next().unwrap_or(Value::Null), position, "`.Value<T>(name)`")?;
            let Some(object) = json.as_object() else {
                return fail(position, "`.Value<T>(name)` needs a JSON object");
            };
            return match object.get(&key) {
                None | Some(serde_json::Value::Null) => Ok(Value::default_of(ty)),
                Some(_) => cast(ty, Value::Json(json.child(JsonKey::Name(key))), position),
            };
        }
        if method == Method::ToString {
            return Ok(Value::Str(receiver.to_string()));
        }
        let s = text(receiver, position, "this method")?;
        let mut args = args.into_iter();
        let mut argument = |what: &str, ignore_case: bool| {
            let arg = text(args.next().unwrap_or(Value::Null), position, what)?;
            Ok::<_, Flow>(if ignore_case { (s.to_lowercase(), arg.to_lowercase()) } else { (s.clone(), arg) })
        };
        Ok(match method {
            Method::ToLower => Value::Str(s.to_lowercase()),
            Method::ToUpper => Value::Str(s.to_uppercase()),
            Method::Trim => Value::Str(s.trim().to_owned()),
            Method::Contains(ignore_case) => {
                let (s, arg) = argument("`.Contains`", ignore_case)?;
                Value::Bool(s.contains(&arg))
            }
            Method::StartsWith(ignore_case) => {
                let (s, arg) = argument("`.StartsWith`", ignore_case)?;
                Value::Bool(s.starts_with(&arg))
            }
            Method::EndsWith(ignore_case) => {
                let (s, arg) = argument("`.EndsWith`", ignore_case)?;
                Value::Bool(s.ends_with(&arg))
            }
            Method::Equals(ignore_case) => match args.next().map(Value::scalar) {
                Some(Value::Str(other)) if ignore_case => Value::Bool(s.to_lowercase() == other.to_lowercase()),
                Some(other) => Value::Bool(equal(Value::Str(s), other)),
                None => Value::Bool(false),
            },
            Method::Split => {
                let separators = args.map(|a| text(a, position, "`.Split`")).collect::<Eval<Vec<String>>>()?;
                Value::Strings(split(&s, &separators))
            }
            Method::ToString | Method::JsonValue(_) => Value::Str(s),
        })
    }
}

/// A request's values held in memory: a [`RequestContext`] for tests, tools that evaluate a
/// policy offline (check-config, import), and fuzzing.
#[derive(Debug, Clone, Default)]
pub struct RequestSnapshot {
    pub subscription: Option<(String, String)>,
    pub api: (String, String),
    pub operation: (String, String),
    pub client_ip: String,
    /// Header names compare case-insensitively.
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub variables: std::collections::HashMap<String, Value>,
    pub response_status: Option<u16>,
    pub region: String,
    pub body: Option<Arc<serde_json::Value>>,
}

impl RequestContext for RequestSnapshot {
    fn subscription_id(&self) -> Option<&str> {
        self.subscription.as_ref().map(|(id, _)| id.as_str())
    }
    fn subscription_name(&self) -> Option<&str> {
        self.subscription.as_ref().map(|(_, name)| name.as_str())
    }
    fn api_id(&self) -> &str {
        &self.api.0
    }
    fn api_name(&self) -> &str {
        &self.api.1
    }
    fn operation_id(&self) -> &str {
        &self.operation.0
    }
    fn operation_name(&self) -> &str {
        &self.operation.1
    }
    fn client_ip(&self) -> &str {
        &self.client_ip
    }
    fn request_header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> =
            self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
        (!values.is_empty()).then(|| values.join(","))
    }
    fn query_parameter(&self, name: &str) -> Option<String> {
        self.query.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
    fn variable(&self, name: &str) -> Option<Value> {
        self.variables.get(name).cloned()
    }
    fn set_variable(&mut self, name: &str, value: Value) {
        self.variables.insert(name.to_owned(), value);
    }
    fn response_status(&self) -> Option<u16> {
        self.response_status
    }
    fn region(&self) -> &str {
        &self.region
    }
    fn request_body_json(&self) -> Option<Arc<serde_json::Value>> {
        self.body.clone()
    }
}
