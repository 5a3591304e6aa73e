//! Whatever client text the gateway puts into a backend URL, the result is refused or stays
//! under the backend's base path. The containment is checked here independently of the crate's own
//! check: the built URL's decoded path segments must start with the base's, and none after them may
//! be a dot segment.
#![no_main]

use backend_url::{BaseUrl, Url, check_client_path, check_name, encode_segment, percent_decode};
use libfuzzer_sys::fuzz_target;

const BASES: [&str; 4] = [
    "http://127.0.0.1:18991/base/agents",
    "https://x.openai.azure.com",
    "https://host/openai/deployments/gpt-4o/",
    "http://[::1]:8080/t%20enant/v1",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let base = BaseUrl::parse(BASES[usize::from(selector) % BASES.len()]).expect("valid base");
    let (path, query) = text.split_once('?').map_or((text, None), |(p, q)| (p, Some(q)));
    // An `http` API's sub-path, as the gateway forwards it.
    if check_client_path(path).is_ok()
        && let Ok(url) = base.join(path, query)
    {
        assert_under(&base, &url);
    }
    // A deployment name, decoded and encoded into one segment, as the Azure routes forward it.
    if let Ok(name) = percent_decode(path)
        && check_name(&name).is_ok()
    {
        let suffix = format!("/openai/deployments/{}/chat/completions", encode_segment(&name));
        let url = base.join(&suffix, query).expect("an encoded name always stays under the base");
        assert_under(&base, &url);
        let segments: Vec<&str> = url.path_segments().expect("segments").collect();
        assert!(segments.contains(&encode_segment(&name).as_str()), "the name is one segment: {url}");
    }
});

fn assert_under(base: &BaseUrl, url: &Url) {
    let base_url = Url::parse(base.as_str()).expect("base");
    assert_eq!(url.host(), base_url.host(), "{url}");
    assert_eq!(url.port_or_known_default(), base_url.port_or_known_default(), "{url}");
    let decoded = |url: &Url| -> Vec<String> {
        url.path_segments()
            .map(|segments| segments.filter(|s| !s.is_empty()).map(|s| percent_decode(s).unwrap_or_default()).collect())
            .unwrap_or_default()
    };
    let base_segments = decoded(&base_url);
    let segments = decoded(url);
    assert!(segments.starts_with(&base_segments), "{url} is not under {}", base.as_str());
    for segment in &segments[base_segments.len()..] {
        let name = segment.split(';').next().unwrap_or("");
        assert!(name != "." && name != "..", "dot segment in {url}");
    }
}
