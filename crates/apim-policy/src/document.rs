//! A lenient reader for API Management policy documents.
//!
//! Real policy files are not well-formed XML: API Management accepts raw `"` inside `"`-quoted
//! attribute expressions (`value="@(context.Request.Headers.GetValueOrDefault("x", ""))"`) and raw
//! `<` from generics and comparisons (`As<JObject>()`, `a < b`) in attributes and text. So where an
//! attribute value or a text starts with `@(` or `@{`, the expression is matched with C# rules
//! (strings, verbatim and interpolated strings, chars, comments) up to its closing bracket before
//! anything else is read as XML. Everything else is XML: elements, attributes in `"` or `'`,
//! comments, CDATA, the five named entities and numeric character references.
//!
//! While reading, `{{name}}` named values are replaced from [`Sources::named_values`],
//! `{placeholder}`s (deployment templates such as `{backend-id}`) from [`Sources::placeholders`],
//! and `<include-fragment fragment-id="..."/>` by the children of the fragment that
//! [`Sources::fragments`] loads. `<base />` stays a node of its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::Position;
use crate::lexer::{LexError, expression_length};

/// Elements nest at most this deep, so a hostile document cannot exhaust the stack.
const MAX_DEPTH: usize = 128;
/// Fragments include fragments at most this deep (a cycle is reported before that).
const MAX_FRAGMENT_DEPTH: usize = 16;

/// A policy document: its root element (normally `<policies>`, or `<fragment>` for a fragment).
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub root: Element,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Element {
    pub name: String,
    pub position: Position,
    /// The fragment this element came from, `None` for the document itself.
    pub fragment: Option<Arc<str>>,
    pub attributes: Vec<Attribute>,
    pub children: Vec<Node>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Element(Element),
    Text(Text),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub position: Position,
    /// Entities decoded, named values and placeholders replaced.
    pub value: String,
    /// Where the value starts (after the opening quote).
    pub value_position: Position,
}

/// Text content, trimmed; whitespace-only text is dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct Text {
    pub value: String,
    /// Where the first non-whitespace character is.
    pub position: Position,
}

impl Element {
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// Every attribute value and text under this element (itself included), in document order,
    /// with the element it belongs to: what `compile_value` is run on to compile a policy.
    pub fn values(&self) -> Vec<(&Element, &str, Position)> {
        let mut out = Vec::new();
        self.collect_values(&mut out);
        out
    }

    fn collect_values<'e>(&'e self, out: &mut Vec<(&'e Element, &'e str, Position)>) {
        out.extend(self.attributes.iter().map(|a| (self, a.value.as_str(), a.value_position)));
        for child in &self.children {
            match child {
                Node::Element(e) => e.collect_values(out),
                Node::Text(t) => out.push((self, t.value.as_str(), t.position)),
            }
        }
    }

    /// The element's text content, when it has exactly one text child and no elements.
    pub fn text(&self) -> Option<&Text> {
        match self.children.as_slice() {
            [Node::Text(t)] => Some(t),
            _ => None,
        }
    }
}

/// Loads `<fragment>` documents by their id.
pub trait FragmentLoader {
    /// The fragment document's source, or why it cannot be had.
    fn load(&self, fragment_id: &str) -> Result<String, String>;
}

/// No fragments: every `<include-fragment>` is an error that names the fragment.
pub struct NoFragments;

impl FragmentLoader for NoFragments {
    fn load(&self, fragment_id: &str) -> Result<String, String> {
        Err(format!("no fragments are configured, so fragment `{fragment_id}` cannot be included"))
    }
}

/// What a document refers to outside itself.
pub struct Sources<'a> {
    /// `{{name}}` → value. A name missing here is an error that names it.
    pub named_values: &'a HashMap<String, String>,
    /// `{name}` → value, for deployment templates (`{backend-id}`). A `{name}` not in this map
    /// is left as written, because `{id}` is also how URI templates write their parameters.
    pub placeholders: &'a HashMap<String, String>,
    pub fragments: &'a dyn FragmentLoader,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    /// The fragment the error is in, `None` for the document itself.
    pub fragment: Option<String>,
    pub position: Position,
    pub message: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(fragment) = &self.fragment {
            write!(f, "fragment `{fragment}`, ")?;
        }
        write!(f, "{}: {}", self.position, self.message)
    }
}

impl std::error::Error for ReadError {}

impl From<LexError> for ReadError {
    fn from(e: LexError) -> Self {
        ReadError { fragment: None, position: e.position, message: e.message }
    }
}

impl Document {
    /// Reads a policy document, resolving named values, placeholders and fragments.
    pub fn read(src: &str, sources: &Sources<'_>) -> Result<Document, ReadError> {
        read_document(src, sources, None, &mut Vec::new())
    }
}

fn read_document(
    src: &str,
    sources: &Sources<'_>,
    fragment: Option<Arc<str>>,
    including: &mut Vec<String>,
) -> Result<Document, ReadError> {
    let in_fragment = |mut e: ReadError| {
        if e.fragment.is_none() {
            e.fragment = fragment.as_deref().map(str::to_owned);
        }
        e
    };
    let mut reader = Reader { src, offset: 0, position: Position::START, sources, fragment: fragment.clone() };
    let mut root = reader.document().map_err(in_fragment)?;
    resolve_fragments(&mut root, sources, including).map_err(in_fragment)?;
    Ok(Document { root })
}

/// Replaces every `<include-fragment>` under `element` with the children of the fragment's root.
fn resolve_fragments(
    element: &mut Element,
    sources: &Sources<'_>,
    including: &mut Vec<String>,
) -> Result<(), ReadError> {
    let mut children = Vec::with_capacity(element.children.len());
    for child in std::mem::take(&mut element.children) {
        match child {
            Node::Element(e) if e.name == "include-fragment" => children.extend(include(&e, sources, including)?),
            Node::Element(mut e) => {
                resolve_fragments(&mut e, sources, including)?;
                children.push(Node::Element(e));
            }
            text @ Node::Text(_) => children.push(text),
        }
    }
    element.children = children;
    Ok(())
}

fn include(element: &Element, sources: &Sources<'_>, including: &mut Vec<String>) -> Result<Vec<Node>, ReadError> {
    let error = |message: String| ReadError { fragment: None, position: element.position, message };
    let Some(id) = element.attribute("fragment-id") else {
        return Err(error("`include-fragment` needs a `fragment-id` attribute naming the fragment".into()));
    };
    let id = id.value.as_str();
    if including.iter().any(|i| i == id) {
        return Err(error(format!(
            "fragment `{id}` includes itself (through {}): remove the cycle",
            including.join(" → ")
        )));
    }
    if including.len() >= MAX_FRAGMENT_DEPTH {
        return Err(error(format!("fragments are nested more than {MAX_FRAGMENT_DEPTH} deep at `{id}`")));
    }
    let src = sources.fragments.load(id).map_err(|why| error(format!("fragment `{id}` cannot be loaded: {why}")))?;
    including.push(id.to_owned());
    let fragment = read_document(&src, sources, Some(Arc::from(id)), including)?;
    including.pop();
    if fragment.root.name != "fragment" {
        return Err(ReadError {
            fragment: Some(id.to_owned()),
            position: fragment.root.position,
            message: format!("a fragment's root element must be `<fragment>`, not `<{}>`", fragment.root.name),
        });
    }
    Ok(fragment.root.children)
}

struct Reader<'a, 's> {
    src: &'a str,
    offset: usize,
    position: Position,
    sources: &'a Sources<'s>,
    fragment: Option<Arc<str>>,
}

impl Reader<'_, '_> {
    fn rest(&self) -> &str {
        &self.src[self.offset..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn advance(&mut self, bytes: usize) {
        let taken = &self.src[self.offset..self.offset + bytes];
        self.position = self.position.advanced_by(taken);
        self.offset += bytes;
    }

    fn error<T>(&self, position: Position, message: impl Into<String>) -> Result<T, ReadError> {
        Err(ReadError { fragment: None, position, message: message.into() })
    }

    fn skip_whitespace(&mut self) {
        let n = self.rest().len() - self.rest().trim_start().len();
        self.advance(n);
    }

    /// Skips up to and including `end`; `what` names the construct for the error.
    fn skip_past(&mut self, end: &str, what: &str, start: Position) -> Result<(), ReadError> {
        match self.rest().find(end) {
            Some(i) => {
                self.advance(i + end.len());
                Ok(())
            }
            None => self.error(start, format!("this {what} is never closed: add `{end}`")),
        }
    }

    /// Skips comments, processing instructions and whitespace between elements.
    fn skip_misc(&mut self) -> Result<(), ReadError> {
        loop {
            self.skip_whitespace();
            let start = self.position;
            if self.rest().starts_with("<!--") {
                self.skip_past("-->", "comment", start)?;
            } else if self.rest().starts_with("<?") {
                self.skip_past("?>", "processing instruction", start)?;
            } else if self.rest().starts_with("<!DOCTYPE") {
                return self.error(start, "document type declarations are not allowed in policy documents: remove it");
            } else {
                return Ok(());
            }
        }
    }

    fn document(&mut self) -> Result<Element, ReadError> {
        self.rest().starts_with('\u{feff}').then(|| self.advance('\u{feff}'.len_utf8()));
        self.skip_misc()?;
        if !self.rest().starts_with('<') {
            return self.error(self.position, "a policy document starts with an element such as `<policies>`");
        }
        let root = self.element(0)?;
        self.skip_misc()?;
        if !self.rest().is_empty() {
            return self.error(
                self.position,
                format!("only one root element is allowed; `<{}>` has already ended: remove what follows", root.name),
            );
        }
        Ok(root)
    }

    fn name(&mut self, what: &str) -> Result<String, ReadError> {
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
            .unwrap_or(self.rest().len());
        if len == 0 || !self.rest().starts_with(|c: char| c.is_alphabetic() || c == '_') {
            return self.error(self.position, format!("expected {what} here"));
        }
        let name = self.rest()[..len].to_owned();
        self.advance(len);
        Ok(name)
    }

    /// At `<` of a start tag.
    fn element(&mut self, depth: usize) -> Result<Element, ReadError> {
        let position = self.position;
        if depth >= MAX_DEPTH {
            return self.error(position, format!("elements are nested more than {MAX_DEPTH} deep"));
        }
        self.advance(1);
        let name = self.name("an element name after `<`")?;
        let mut element =
            Element { name, position, fragment: self.fragment.clone(), attributes: Vec::new(), children: Vec::new() };
        loop {
            self.skip_whitespace();
            if self.rest().starts_with("/>") {
                self.advance(2);
                return Ok(element);
            }
            if self.rest().starts_with('>') {
                self.advance(1);
                break;
            }
            if self.rest().is_empty() {
                return self.error(position, format!("the start tag of `<{}>` is never closed: add `>`", element.name));
            }
            let attribute = self.attribute(&element)?;
            if element.attribute(&attribute.name).is_some() {
                return self.error(
                    attribute.position,
                    format!("attribute `{}` appears twice on `<{}>`: keep one", attribute.name, element.name),
                );
            }
            element.attributes.push(attribute);
        }
        self.content(&mut element, depth)?;
        Ok(element)
    }

    fn attribute(&mut self, element: &Element) -> Result<Attribute, ReadError> {
        let position = self.position;
        let name = self.name(&format!("an attribute name, `>` or `/>` in the start tag of `<{}>`", element.name))?;
        self.skip_whitespace();
        if !self.rest().starts_with('=') {
            return self.error(self.position, format!("attribute `{name}` needs `=` and a quoted value"));
        }
        self.advance(1);
        self.skip_whitespace();
        let quote = match self.peek() {
            Some(q @ ('"' | '\'')) => q,
            _ => return self.error(self.position, format!("the value of attribute `{name}` must be in quotes")),
        };
        self.advance(1);
        let value_position = self.position;
        let raw = match self.expression_at(quote)? {
            Some(raw) => raw,
            None => {
                let Some(len) = self.rest().find(quote) else {
                    return self.error(
                        value_position,
                        format!("the value of attribute `{name}` is never closed: add `{quote}`"),
                    );
                };
                let raw = self.rest()[..len].to_owned();
                self.advance(len);
                raw
            }
        };
        self.advance(quote.len_utf8());
        let value = self.resolve(&decode_entities(&raw, value_position)?, value_position, true)?;
        Ok(Attribute { name, position, value, value_position })
    }

    /// When the text here (after whitespace) starts with `@(` or `@{`, reads the whole expression
    /// with C# rules and returns it raw, provided it is followed (after whitespace) by `end`.
    /// Otherwise reads nothing, and the caller reads the value as plain XML.
    fn expression_at(&mut self, end: char) -> Result<Option<String>, ReadError> {
        let lead = self.rest().len() - self.rest().trim_start().len();
        let at = &self.rest()[lead..];
        if !(at.starts_with("@(") || at.starts_with("@{")) {
            return Ok(None);
        }
        let start = self.position.advanced_by(&self.rest()[..lead]);
        let len = match expression_length(at, start) {
            Ok(len) => len,
            // The expression may be written with entities (`&quot;`) that hide a quote; reading it
            // as plain XML instead gives the compiler the decoded text.
            Err(_) if has_entities(at, end) => return Ok(None),
            Err(e) => {
                return self.error(
                    start,
                    format!(
                        "this policy expression does not end where it should: {} at {}; check its brackets and quotes",
                        e.message, e.position
                    ),
                );
            }
        };
        let after = &at[len..];
        if !after.trim_start().starts_with(end) {
            if has_entities(at, end) {
                return Ok(None);
            }
            let found = start.advanced_by(&at[..len]);
            return self.error(
                found,
                format!("a policy expression must be the whole value, but text follows it here: end the value with `{end}` right after the expression"),
            );
        }
        let trailing = after.len() - after.trim_start().len();
        let raw = self.rest()[..lead + len + trailing].to_owned();
        self.advance(lead + len + trailing);
        Ok(Some(raw))
    }

    /// Children and text up to the end tag of `element`.
    fn content(&mut self, element: &mut Element, depth: usize) -> Result<(), ReadError> {
        loop {
            let start = self.position;
            let rest = self.rest();
            if rest.is_empty() {
                return self.error(
                    element.position,
                    format!("`<{}>` is never closed: add `</{}>`", element.name, element.name),
                );
            } else if rest.starts_with("</") {
                self.advance(2);
                let end_position = self.position;
                let name = self.name("an element name after `</`")?;
                if name != element.name {
                    return self.error(
                        end_position,
                        format!(
                            "`</{name}>` closes `<{}>` opened at {}: expected `</{}>`",
                            element.name, element.position, element.name
                        ),
                    );
                }
                self.skip_whitespace();
                if !self.rest().starts_with('>') {
                    return self.error(self.position, format!("the end tag `</{name}` needs `>`"));
                }
                self.advance(1);
                return Ok(());
            } else if rest.starts_with("<!--") {
                self.skip_past("-->", "comment", start)?;
            } else if rest.starts_with("<![CDATA[") {
                self.advance("<![CDATA[".len());
                let text_position = self.position;
                let Some(len) = self.rest().find("]]>") else {
                    return self.error(start, "this CDATA section is never closed: add `]]>`");
                };
                let raw = self.rest()[..len].to_owned();
                self.advance(len + 3);
                self.push_text(element, raw, text_position, false)?;
            } else if rest.starts_with("<?") {
                self.skip_past("?>", "processing instruction", start)?;
            } else if starts_tag(rest) {
                let child = self.element(depth + 1)?;
                element.children.push(Node::Element(child));
            } else {
                self.text(element, start)?;
            }
        }
    }

    /// Text up to the next tag; a `<` that starts no tag (a comparison) is text.
    fn text(&mut self, element: &mut Element, start: Position) -> Result<(), ReadError> {
        if let Some(raw) = self.expression_at('<')? {
            return self.push_text(element, raw, start, true);
        }
        let rest = self.rest();
        let mut len = rest.len();
        for (i, _) in rest.match_indices('<') {
            let at = &rest[i..];
            if at.starts_with("</") || at.starts_with("<!") || at.starts_with("<?") || starts_tag(at) {
                len = i;
                break;
            }
        }
        // `len` can be 0 only when the text starts a tag, which `content` handled already; make
        // progress regardless so a malformed `<` can never loop forever.
        let len = len.max(rest.chars().next().map_or(0, char::len_utf8));
        let raw = rest[..len].to_owned();
        self.advance(len);
        self.push_text(element, raw, start, true)
    }

    fn push_text(
        &mut self,
        element: &mut Element,
        raw: String,
        start: Position,
        decode: bool,
    ) -> Result<(), ReadError> {
        let lead = raw.len() - raw.trim_start().len();
        let position = start.advanced_by(&raw[..lead]);
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(());
        }
        let decoded = if decode { decode_entities(trimmed, position)? } else { trimmed.to_owned() };
        // A Liquid template's `{{body.x}}` is Liquid, not a named value.
        let liquid = element.name == "set-body" && element.attribute("template").is_some_and(|t| t.value == "liquid");
        let value = self.resolve(&decoded, position, !liquid)?;
        match element.children.last_mut() {
            // Text split by a comment or CDATA section is one text.
            Some(Node::Text(previous)) => previous.value.push_str(&value),
            _ => element.children.push(Node::Text(Text { value, position })),
        }
        Ok(())
    }

    /// Replaces named values (when `named_values`) and placeholders in a decoded value.
    fn resolve(&self, value: &str, position: Position, named_values: bool) -> Result<String, ReadError> {
        if !value.contains('{') {
            return Ok(value.to_owned());
        }
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let at = &rest[i..];
            if named_values && let Some(name) = braced_name(&at[1..], "}}").filter(|_| at.starts_with("{{")) {
                let Some(v) = self.sources.named_values.get(name) else {
                    let offset = value.len() - rest.len() + i;
                    return self.error(
                        position.advanced_by(&value[..offset]),
                        format!("named value `{name}` is not defined: add `{name}` to the named values"),
                    );
                };
                out.push_str(v);
                rest = &at[name.len() + 4..];
            } else if let Some(v) = braced_name(at, "}").and_then(|name| self.sources.placeholders.get(name)) {
                out.push_str(v);
                rest = &at[at.find('}').map_or(at.len(), |e| e + 1)..];
            } else {
                out.push('{');
                rest = &at[1..];
            }
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// For `{name}` (with `open` already past the first `{`): the name, when `s` is `{name` + `close`
/// and the name is made of the characters named values and placeholders use.
fn braced_name<'s>(s: &'s str, close: &str) -> Option<&'s str> {
    let body = s.strip_prefix('{')?;
    let end = body.find(close)?;
    let name = &body[..end];
    (!name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))).then_some(name)
}

/// `<` followed by a name: a start tag (as opposed to a `<` in a comparison).
fn starts_tag(s: &str) -> bool {
    s.strip_prefix('<').and_then(|r| r.chars().next()).is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Whether the value up to `end` contains an entity reference.
fn has_entities(s: &str, end: char) -> bool {
    s[..s.find(end).unwrap_or(s.len())].contains('&')
}

/// Decodes `&lt;` `&gt;` `&amp;` `&quot;` `&apos;` and `&#...;`. Any other `&` stays as written:
/// raw `&&` in expressions is common and API Management accepts it.
fn decode_entities(s: &str, position: Position) -> Result<String, ReadError> {
    if !s.contains('&') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let at = &rest[i..];
        let entity = at.find(';').map(|end| &at[1..end]).filter(|e| e.len() <= 10);
        let decoded = match entity {
            Some("lt") => Some('<'),
            Some("gt") => Some('>'),
            Some("amp") => Some('&'),
            Some("quot") => Some('"'),
            Some("apos") => Some('\''),
            Some(e) if e.starts_with('#') => {
                let code = match e.strip_prefix("#x").or_else(|| e.strip_prefix("#X")) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => e[1..].parse().ok(),
                };
                match code.and_then(char::from_u32) {
                    Some(c) => Some(c),
                    None => {
                        let offset = s.len() - rest.len() + i;
                        return Err(ReadError {
                            fragment: None,
                            position: position.advanced_by(&s[..offset]),
                            message: format!("`&{e};` is not a valid character reference"),
                        });
                    }
                }
            }
            _ => None,
        };
        match (decoded, entity) {
            (Some(c), Some(e)) => {
                out.push(c);
                rest = &at[e.len() + 2..];
            }
            _ => {
                out.push('&');
                rest = &at[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}
