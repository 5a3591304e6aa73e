//! Subscriptions and their keys.
//!
//! Keys are held only as SHA-256 digests. A presented key is hashed, looked up by the first eight
//! bytes of its digest (which reveal nothing usable about the key) and then compared in full in
//! constant time, so neither the lookup nor the comparison leaks how close a guess was.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{EnvLookup, SubscriptionConfig};

#[derive(Debug)]
pub struct Subscription {
    pub id: String,
    pub name: String,
    pub team: String,
    all_apis: bool,
    apis: Vec<String>,
}

impl Subscription {
    pub fn may_call(&self, api_id: &str) -> bool {
        self.all_apis || self.apis.iter().any(|a| a == api_id)
    }
}

type Digest32 = [u8; 32];

/// A key as the gateway holds it: its SHA-256 digest (subscription keys, the admin key).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(Digest32);

impl KeyDigest {
    /// From validated config: `key-sha256`, else the key in the `key-env` variable.
    pub fn from_config(key_sha256: &Option<String>, key_env: &Option<String>, env: EnvLookup<'_>) -> Option<Self> {
        match (key_sha256, key_env) {
            (Some(hex_digest), _) => {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(hex_digest, &mut digest).ok()?;
                Some(Self(digest))
            }
            (None, Some(var)) => Some(Self(sha256(env(var).unwrap_or_default().as_bytes()))),
            (None, None) => None,
        }
    }

    /// Whether `key` is this key, compared in constant time.
    pub fn matches(&self, key: &str) -> bool {
        bool::from(self.0.ct_eq(&sha256(key.as_bytes())))
    }
}

#[derive(Default)]
pub struct SubscriptionStore {
    by_prefix: HashMap<u64, Vec<(Digest32, Arc<Subscription>)>>,
}

/// Where a key may be presented, in the order they are looked at.
const KEY_HEADERS: [&str; 2] = ["ocp-apim-subscription-key", "api-key"];
pub const KEY_QUERY_PARAM: &str = "subscription-key";

impl SubscriptionStore {
    /// Builds the store from validated config (so every key source is known to be present).
    pub fn from_config(subscriptions: &[SubscriptionConfig], env: EnvLookup<'_>) -> Self {
        let mut store = Self::default();
        for config in subscriptions {
            let Some(KeyDigest(digest)) = KeyDigest::from_config(&config.key_sha256, &config.key_env, env) else {
                continue;
            };
            let subscription = Arc::new(Subscription {
                id: config.id.clone(),
                name: config.name.clone(),
                team: config.team.clone(),
                all_apis: config.apis.iter().any(|a| a == "*"),
                apis: config.apis.clone(),
            });
            store.by_prefix.entry(prefix(&digest)).or_default().push((digest, subscription));
        }
        store
    }

    pub fn find(&self, key: &str) -> Option<Arc<Subscription>> {
        let digest = sha256(key.as_bytes());
        let candidates = self.by_prefix.get(&prefix(&digest))?;
        let mut found = None;
        for (stored, subscription) in candidates {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(subscription.clone());
            }
        }
        found
    }
}

fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// A key in the form `key-sha256` holds it: lower-case hex SHA-256.
pub fn key_sha256_hex(key: &str) -> String {
    hex::encode(sha256(key.as_bytes()))
}

fn prefix(digest: &Digest32) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The key a caller presented: `Ocp-Apim-Subscription-Key`, `api-key`, `Authorization: Bearer`, or the
/// `subscription-key` query parameter. Empty values count as absent.
pub fn presented_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(value) = KEY_HEADERS.iter().find_map(|name| header_key(headers, name)).or_else(|| bearer_key(headers)) {
        return Some(value.into());
    }
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, value)| *name == KEY_QUERY_PARAM && !value.is_empty())
        .map(|(_, value)| percent_decode(value))
}

/// A header's value, trimmed; empty counts as absent.
pub fn header_key<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn percent_decode(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['%', '+']) {
        return value.into();
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn store() -> SubscriptionStore {
        let hashed = key_sha256_hex("hashed-key");
        let configs = vec![
            SubscriptionConfig {
                id: "a".into(),
                name: "A".into(),
                team: "team-a".into(),
                apis: vec!["aoai".into()],
                key_sha256: Some(hashed),
                key_env: None,
            },
            SubscriptionConfig {
                id: "b".into(),
                name: "B".into(),
                team: "team-b".into(),
                apis: vec!["*".into()],
                key_sha256: None,
                key_env: Some("B_KEY".into()),
            },
        ];
        let env = |name: &str| (name == "B_KEY").then(|| "plain-key".to_owned());
        SubscriptionStore::from_config(&configs, &env)
    }

    #[test]
    fn finds_by_hashed_and_env_keys() {
        let store = store();
        let a = store.find("hashed-key").expect("a");
        assert_eq!((a.id.as_str(), a.team.as_str()), ("a", "team-a"));
        assert!(a.may_call("aoai") && !a.may_call("mcp"));
        let b = store.find("plain-key").expect("b");
        assert!(b.may_call("anything"));
        assert!(store.find("plain-kez").is_none());
        assert!(store.find("").is_none());
    }

    #[test]
    fn reads_every_key_location() {
        let with = |name: &'static str, value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            headers
        };
        let key = |headers: &HeaderMap, query| presented_key(headers, query).map(|k| k.into_owned());
        assert_eq!(key(&with("ocp-apim-subscription-key", "k1"), None).as_deref(), Some("k1"));
        assert_eq!(key(&with("api-key", "k2"), None).as_deref(), Some("k2"));
        assert_eq!(key(&with("authorization", "Bearer k3"), None).as_deref(), Some("k3"));
        assert_eq!(key(&with("authorization", "Basic k3"), None), None);
        assert_eq!(key(&with("api-key", "  "), None), None);
        let none = HeaderMap::new();
        assert_eq!(key(&none, Some("api-version=1&subscription-key=k%2B4")).as_deref(), Some("k+4"));
        assert_eq!(key(&none, Some("subscription-key=")), None);
        assert_eq!(key(&none, None), None);
    }
}
