//! Backend URLs built from client text, kept under the backend's base path.
//!
//! A backend URL is often scoped: `https://x.openai.azure.com/openai/deployments/gpt-4o`, or a
//! tenant's prefix on a shared host. The gateway appends client text to it (an `http` API's
//! sub-path, an Azure deployment name) and sends the backend's credential along. URL parsers
//! normalise dot segments, so `..` in that text, raw or percent-encoded (`%2e%2e`, `.%2E`), or
//! spelt with a backslash that some servers read as `/`, would climb out of the base path and hand
//! the credential to whatever else the host serves. Two guards, independent of each other:
//!
//! 1. Client text is checked before anything is built: [`check_client_path`] for a sub-path,
//!    [`check_name`] for a single name such as a deployment. Dot segments, encoded slashes,
//!    backslashes, control characters, double encodings of those, and text that is not UTF-8 once
//!    decoded are refused.
//! 2. [`BaseUrl::join`] parses the URL it built, exactly as the HTTP client will, and refuses it
//!    unless it has the base's scheme, host and port and its path is the base path or below it.
//!
//! This crate is kept apart from the gateway, with no dependency but `url`, so that it can be
//! fuzzed cheaply (`fuzz/fuzz_targets/backend_url.rs`).

use std::fmt;

pub use url::Url;

/// Why client text was not forwarded. The messages are what the client reads in its 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `.` or `..` segment, raw or percent-encoded.
    DotSegment,
    /// `%2F`: a slash the client hid from the gateway's routing.
    EncodedSlash,
    /// `\` or `%5C`, which some servers read as `/`.
    Backslash,
    /// A control character (raw or percent-encoded), including NUL.
    ControlCharacter,
    /// `%25` encoding one of the characters above, for servers that decode twice.
    DoubleEncoded,
    /// A percent-encoding that decodes to bytes that are not UTF-8 (overlong forms of `.` and `/`).
    NotUtf8,
    /// A name that is empty, or longer than [`MAX_NAME_LEN`].
    BadLength,
    /// The built URL left the base path (or its origin); guard 1 should have made this impossible.
    OutsideBase,
}

/// The longest deployment or model name the gateway forwards. Azure OpenAI deployment names are at
/// most 64 characters and model ids are short; a name of kilobytes is a mistake or an attack
/// (one echoed into a response header once broke the backend's answer).
pub const MAX_NAME_LEN: usize = 256;

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DotSegment => "The request path contains a '.' or '..' segment (raw or percent-encoded), which the gateway does not forward.",
            Self::EncodedSlash => "The request path contains an encoded slash (%2F), which the gateway does not forward.",
            Self::Backslash => "The request path contains a backslash (\\ or %5C), which the gateway does not forward.",
            Self::ControlCharacter => "The request path contains a control character, which the gateway does not forward.",
            Self::DoubleEncoded => "The request path contains a double-encoded '.', '/' or '\\' (%252E, %252F, %255C), which the gateway does not forward.",
            Self::NotUtf8 => "The request path contains a percent-encoding that is not UTF-8.",
            Self::BadLength => "The deployment or model name must be 1 to 256 characters long.",
            Self::OutsideBase => "The request path does not stay under the backend's base path.",
        })
    }
}

impl std::error::Error for Refusal {}

/// Checks an `http` API's sub-path as the client sent it (percent-encoded, starting with `/`, or
/// empty), segment by segment.
pub fn check_client_path(path: &str) -> Result<(), Refusal> {
    path.split('/').try_for_each(check_segment)
}

/// Checks one path segment as the client sent it (percent-encoded).
pub fn check_segment(raw: &str) -> Result<(), Refusal> {
    if raw.contains('\\') {
        return Err(Refusal::Backslash);
    }
    let decoded = percent_decode(raw)?;
    check_decoded(&decoded)?;
    if decoded.contains('%') {
        // A second decoding must not produce what the first was refused for.
        check_decoded(&percent_decode(&decoded).map_err(|_| Refusal::DoubleEncoded)?)
            .map_err(|_| Refusal::DoubleEncoded)?;
    }
    Ok(())
}

/// Checks a name that becomes one path segment (an Azure deployment), already percent-decoded.
/// It may not contain `/` or `%` at all: the gateway encodes it itself.
pub fn check_name(name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Refusal::BadLength);
    }
    if name.contains('/') {
        return Err(Refusal::EncodedSlash);
    }
    if name.contains('%') {
        return Err(Refusal::DoubleEncoded);
    }
    check_decoded(name)
}

/// What a decoded segment may not be or contain.
fn check_decoded(segment: &str) -> Result<(), Refusal> {
    if segment.contains('\\') {
        return Err(Refusal::Backslash);
    }
    if segment.chars().any(char::is_control) {
        return Err(Refusal::ControlCharacter);
    }
    // `..;x` is `..` to servers that strip path parameters (Tomcat, Jetty).
    let name = segment.split(';').next().unwrap_or("");
    if name == "." || name == ".." {
        return Err(Refusal::DotSegment);
    }
    Ok(())
}

/// `%XX` decoded once; other characters as they are. An encoded slash is refused here, since it
/// cannot be told from a separator once decoded.
pub fn percent_decode(raw: &str) -> Result<String, Refusal> {
    if !raw.contains('%') {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b'/') => return Err(Refusal::EncodedSlash),
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| Refusal::NotUtf8)
}

/// Percent-encodes everything but RFC 3986's unreserved characters: a name becomes exactly one
/// path segment.
pub fn encode_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A backend's configured URL, parsed once.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    /// As the URL parser serialises it, without a trailing slash.
    text: String,
    url: Url,
    /// The base path without its trailing slash (`""` for the host's root).
    path: String,
}

impl BaseUrl {
    /// An `http(s)` URL with a host and no query string or fragment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = Url::parse(text).map_err(|e| format!("not a URL ({e}): {text:?}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!("must be an http(s) URL with a host: {text:?}"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("must not carry a query string or a fragment".to_owned());
        }
        let path = url.path().trim_end_matches('/').to_owned();
        let text = url.as_str().trim_end_matches('/').to_owned();
        Ok(Self { text, url, path })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The base URL followed by `suffix` (empty, or starting with `/`; the gateway's literal
    /// segments and client text that passed [`check_client_path`] or was encoded with
    /// [`encode_segment`]) and the query string, if any. Refused unless the URL, parsed as the
    /// HTTP client will parse it, stays under the base.
    pub fn join(&self, suffix: &str, query: Option<&str>) -> Result<Url, Refusal> {
        if !(suffix.is_empty() || suffix.starts_with('/')) {
            return Err(Refusal::OutsideBase);
        }
        let mut text = String::with_capacity(self.text.len() + suffix.len() + query.map_or(0, |q| q.len() + 1));
        text.push_str(&self.text);
        text.push_str(suffix);
        if let Some(query) = query {
            text.push('?');
            text.push_str(query);
        }
        let url = Url::parse(&text).map_err(|_| Refusal::OutsideBase)?;
        if self.contains(&url) { Ok(url) } else { Err(Refusal::OutsideBase) }
    }

    /// Whether `url` has this base's origin and a path at or below the base path.
    pub fn contains(&self, url: &Url) -> bool {
        let same_origin = url.scheme() == self.url.scheme()
            && url.host() == self.url.host()
            && url.port_or_known_default() == self.url.port_or_known_default()
            && url.username() == self.url.username()
            && url.password() == self.url.password();
        let path = url.path();
        same_origin && path.starts_with(&self.path) && matches!(path.as_bytes().get(self.path.len()), None | Some(b'/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for path in [
            "/..",
            "/../admin",
            "/x/../../etc",
            "/.",
            "/%2e%2e/admin",
            "/%2E%2E",
            "/.%2e",
            "/%2e.",
            "/%2E.",
            "/%2e",
            "/..;/admin",
            "/..;jsessionid=1",
            "/x/%2e%2e%3b/y",
        ] {
            assert_eq!(check_client_path(path), Err(Refusal::DotSegment), "{path}");
        }
        assert_eq!(check_client_path("/..%2f.."), Err(Refusal::EncodedSlash));
        assert_eq!(check_client_path("/x%2Fy"), Err(Refusal::EncodedSlash));
        assert_eq!(check_client_path("/..\\admin"), Err(Refusal::Backslash));
        assert_eq!(check_client_path("/..%5cadmin"), Err(Refusal::Backslash));
        assert_eq!(check_client_path("/..%5Cadmin"), Err(Refusal::Backslash));
        assert_eq!(check_client_path("/%252e%252e/admin"), Err(Refusal::DoubleEncoded));
        assert_eq!(check_client_path("/%252F"), Err(Refusal::DoubleEncoded));
        assert_eq!(check_client_path("/%255c"), Err(Refusal::DoubleEncoded));
        assert_eq!(check_client_path("/a%00b"), Err(Refusal::ControlCharacter));
        assert_eq!(check_client_path("/%c0%ae%c0%ae/admin"), Err(Refusal::NotUtf8));
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in
            ["", "/", "/x", "/v1/models", "/a//b/", "/.well-known/x", "/...", "/a..b", "/%20x", "/caf%C3%A9", "/a;b"]
        {
            assert_eq!(check_client_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn names_are_one_segment() {
        assert_eq!(check_name("gpt-4o-prod"), Ok(()));
        assert_eq!(check_name("llama3:8b"), Ok(()));
        assert_eq!(check_name(".."), Err(Refusal::DotSegment));
        assert_eq!(check_name("../x"), Err(Refusal::EncodedSlash));
        assert_eq!(check_name("a%2fb"), Err(Refusal::DoubleEncoded));
        assert_eq!(check_name(""), Err(Refusal::BadLength));
        assert_eq!(check_name(&"m".repeat(MAX_NAME_LEN + 1)), Err(Refusal::BadLength));
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn join_stays_under_the_base() {
        let base = BaseUrl::parse("http://127.0.0.1:18991/base/agents/").expect("valid");
        assert_eq!(base.as_str(), "http://127.0.0.1:18991/base/agents");
        let url = base.join("/x", Some("a=1&b")).expect("under");
        assert_eq!(url.as_str(), "http://127.0.0.1:18991/base/agents/x?a=1&b");
        assert_eq!(base.join("", None).expect("the base itself").path(), "/base/agents");
        for escape in ["/../admin", "/%2e%2e/admin", "/x/../../../etc", "/.%2e/admin"] {
            assert_eq!(base.join(escape, None), Err(Refusal::OutsideBase), "{escape}");
        }
        assert_eq!(base.join("x", None), Err(Refusal::OutsideBase), "a suffix starts with '/'");
        assert_eq!(base.join("s/x", None), Err(Refusal::OutsideBase));
        // A sibling that shares the prefix's text is not under it.
        let sibling = Url::parse("http://127.0.0.1:18991/base/agents-admin").expect("url");
        assert!(!base.contains(&sibling));
        assert!(!base.contains(&Url::parse("http://127.0.0.1:1/base/agents/x").expect("url")));
        let root = BaseUrl::parse("https://api.example.com").expect("valid");
        assert_eq!(root.join("/v1/models", None).expect("under").as_str(), "https://api.example.com/v1/models");
        assert!(BaseUrl::parse("https://x/a?k=v").is_err());
        assert!(BaseUrl::parse("ftp://x/a").is_err());
    }
}
