//! Values computed per request from the context: literal text with placeholders such as
//! `{subscription.id}` or `{request.header.x-user}`. Parsed once at start-up, so an unknown
//! placeholder is a configuration error, and rendering is a walk over pre-split segments.
//!
//! Placeholders: `subscription.id`, `subscription.name`, `subscription.team`, `api.id`,
//! `operation.id`, `request.id`, `client.ip`, `model`, `backend.id`, `cache.status` (hit, miss,
//! bypass, error; `none` without a cache lookup), `request.header.<name>`, `variable.<name>` (set
//! by an earlier `set-variable` policy).
//! `{{` and `}}` stand for literal braces.

use std::fmt::Write;

use http::HeaderName;

use crate::context::RequestContext;

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    SubscriptionId,
    SubscriptionName,
    Team,
    ApiId,
    OperationId,
    RequestId,
    ClientIp,
    Model,
    BackendId,
    CacheStatus,
    Header(HeaderName),
    Variable(String),
}

#[derive(Debug, Clone)]
pub struct Template {
    segments: Vec<Segment>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let brace = rest.as_bytes()[i];
            let after = &rest[i + 1..];
            if after.as_bytes().first() == Some(&brace) {
                literal.push(brace as char);
                rest = &after[1..];
                continue;
            }
            if brace == b'}' {
                return Err(format!("unmatched '}}' in {text:?} (write '}}}}' for a literal brace)"));
            }
            let end = after.find('}').ok_or_else(|| format!("unclosed '{{' in {text:?}"))?;
            if !literal.is_empty() {
                segments.push(Segment::Literal(std::mem::take(&mut literal)));
            }
            segments.push(placeholder(after[..end].trim())?);
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(Self { segments })
    }

    /// The names of the variables (`{variable.<name>}`) this template reads.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Variable(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Whether rendering needs the parsed body (the model comes from it).
    pub fn reads_body(&self) -> bool {
        self.segments.iter().any(|s| matches!(s, Segment::Model))
    }

    /// Whether rendering copies a header that carries credentials (such values must not end up in
    /// metrics or logs).
    pub fn reads_credential_header(&self) -> bool {
        const CREDENTIALS: [&str; 6] =
            ["authorization", "proxy-authorization", "api-key", "ocp-apim-subscription-key", "x-api-key", "cookie"];
        self.segments.iter().any(|s| matches!(s, Segment::Header(name) if CREDENTIALS.contains(&name.as_str())))
    }

    /// The value for this request; placeholders with no value (no subscription yet, a missing
    /// header) render as empty text. A variable is always set by then, since start-up checks that
    /// a set-variable comes first (see `policy::set_variable`), except in on-error after a
    /// failure that came before the set-variable.
    pub fn render(&self, ctx: &RequestContext) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            let subscription = ctx.subscription.as_deref();
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::SubscriptionId => out.push_str(subscription.map_or("", |s| s.id.as_str())),
                Segment::SubscriptionName => out.push_str(subscription.map_or("", |s| s.name.as_str())),
                Segment::Team => out.push_str(subscription.map_or("", |s| s.team.as_str())),
                Segment::ApiId => out.push_str(&ctx.api.id),
                Segment::OperationId => out.push_str(ctx.operation.id()),
                Segment::RequestId => out.push_str(&ctx.request_id),
                Segment::ClientIp => {
                    let _ = write!(out, "{}", ctx.client_ip);
                }
                Segment::Model => out.push_str(ctx.model().unwrap_or("")),
                Segment::BackendId => out.push_str(match (&ctx.backend, &ctx.target) {
                    (Some(backend), _) => &backend.id,
                    (None, Some(target)) => target.id(),
                    (None, None) => "",
                }),
                Segment::CacheStatus => out.push_str(ctx.cache.as_ref().map_or("none", |c| c.status.name())),
                Segment::Header(name) => {
                    out.push_str(ctx.request.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or(""));
                }
                Segment::Variable(name) => out.push_str(ctx.variables.get(name).map_or("", String::as_str)),
            }
        }
        out
    }
}

fn placeholder(name: &str) -> Result<Segment, String> {
    Ok(match name {
        "subscription.id" => Segment::SubscriptionId,
        "subscription.name" => Segment::SubscriptionName,
        "subscription.team" | "team" => Segment::Team,
        "api.id" => Segment::ApiId,
        "operation.id" => Segment::OperationId,
        "request.id" => Segment::RequestId,
        "client.ip" => Segment::ClientIp,
        "model" => Segment::Model,
        "backend.id" => Segment::BackendId,
        "cache.status" => Segment::CacheStatus,
        _ => {
            if let Some(header) = name.strip_prefix("request.header.") {
                let header = HeaderName::try_from(header).map_err(|_| format!("not a header name: {header:?}"))?;
                Segment::Header(header)
            } else if let Some(variable) = name.strip_prefix("variable.").filter(|v| !v.is_empty()) {
                Segment::Variable(variable.to_owned())
            } else {
                return Err(format!(
                    "unknown placeholder {{{name}}} (known: subscription.id, subscription.name, subscription.team, api.id, \
                     operation.id, request.id, client.ip, model, backend.id, cache.status, request.header.<name>, \
                     variable.<name>)"
                ));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_placeholders_and_escapes() {
        let template = Template::parse("team={team} {{literal}} id={subscription.id}").expect("valid");
        assert_eq!(template.segments.len(), 4);
        assert!(matches!(&template.segments[1], Segment::Team));
        assert!(matches!(&template.segments[2], Segment::Literal(t) if t == " {literal} id="));
        assert!(Template::parse("{request.header.x-user}").is_ok());
        assert!(Template::parse("{subscription.tema}").expect_err("unknown").contains("unknown placeholder"));
        assert!(Template::parse("{team").is_err());
        assert!(Template::parse("team}").is_err());
        assert!(Template::parse("{request.header.bad header}").is_err());
        assert!(Template::parse("{cache.status}").is_ok());
        assert!(Template::parse("k={request.header.Api-Key}").expect("valid").reads_credential_header());
        assert!(!Template::parse("{request.header.x-user}").expect("valid").reads_credential_header());
        let variables = Template::parse("{variable.user}-{team}-{variable.tier}").expect("valid");
        assert_eq!(variables.variables().collect::<Vec<_>>(), ["user", "tier"]);
    }
}
