//! What identifies a cached response: the resource (authority, the
//! original path, the query) and the values of the request headers it
//! varies on.

use http::Request;
use http::header::{self, HeaderMap, HeaderName};
use serde::Serialize;

/// The target of a request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// Lower case; empty when the request names none.
    pub authority: String,
    pub path: String,
    pub query: Option<String>,
}

/// One spelling per origin (RFC 9110 §4.2.3): lower case, without a
/// default port or a trailing dot, so that `App.test:80`, `app.test.` and
/// `app.test` are one resource, and a write through one invalidates the
/// pages stored through the others. Both default ports are dropped: the
/// scheme seen here may not be the client's (TLS ended at a proxy).
fn canonical_authority(authority: &str) -> String {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host).to_ascii_lowercase();
    // The port follows the last colon, unless it is an IPv6 literal's own.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if host.ends_with(']') || !host.contains(':') => (host, port),
        _ => (authority.as_str(), ""),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    match port {
        "" | "80" | "443" => host.to_owned(),
        port => format!("{host}:{port}"),
    }
}

impl Target {
    pub(super) fn of<B>(request: &Request<B>) -> Self {
        // Under axum's `nest` the router strips the prefix from the URI it
        // passes on: the original one tells `/v1/items` from `/v2/items`.
        let uri =
            request.extensions().get::<axum::extract::OriginalUri>().map_or(request.uri(), |original| &original.0);
        let authority = match request.uri().authority().or(uri.authority()) {
            Some(authority) => canonical_authority(authority.as_str()),
            None => canonical_authority(
                request.headers().get(header::HOST).and_then(|host| host.to_str().ok()).unwrap_or(""),
            ),
        };
        Self { authority, path: uri.path().to_owned(), query: uri.query().map(str::to_owned) }
    }

    /// The target a `Location` or `Content-Location` names, if it is on
    /// the same authority (RFC 9111 §4.4 forbids invalidating others).
    pub(super) fn referenced(&self, reference: &str) -> Option<Self> {
        let reference = reference.split('#').next()?;
        let absolute = reference.split_once("://").map(|(_, rest)| rest).or_else(|| reference.strip_prefix("//"));
        let (authority, rest) = match absolute {
            Some(rest) => {
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                (canonical_authority(&rest[..end]), &rest[end..])
            }
            None if reference.starts_with('/') => (self.authority.clone(), reference),
            // A relative path: resolved against the request's directory.
            None => {
                let directory = &self.path[..self.path.rfind('/').map_or(0, |i| i + 1)];
                return self.referenced(&format!("{}{reference}", if directory.is_empty() { "/" } else { directory }));
            }
        };
        if authority != self.authority {
            return None;
        }
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query.to_owned())),
            None => (rest, None),
        };
        Some(Self { authority, path: if path.is_empty() { "/".to_owned() } else { path.to_owned() }, query })
    }

    /// The query's parameters sorted by name; repeated names keep their
    /// order, which many frameworks read as a list.
    fn sorted_query(&self) -> Vec<(&str, &str)> {
        let mut pairs: Vec<(&str, &str)> = self
            .query
            .as_deref()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        pairs
    }

    /// Identifies the resource, whatever the request headers.
    pub(super) fn resource(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for part in [self.authority.as_str(), self.path.as_str()] {
            hasher.update(&(part.len() as u64).to_le_bytes()).update(part.as_bytes());
        }
        for (name, value) in self.sorted_query() {
            for part in [name, value] {
                hasher.update(&(part.len() as u64).to_le_bytes()).update(part.as_bytes());
            }
        }
        *hasher.finalize().as_bytes()
    }

    /// Which of `buckets` path namespaces this target's path belongs to:
    /// writes to a path invalidate its bucket, every query and variant.
    pub(super) fn bucket(&self, buckets: usize) -> usize {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.authority.as_bytes()).update(&[0]).update(self.path.as_bytes());
        let hash = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        (u64::from_le_bytes(first) % buckets as u64) as usize
    }
}

/// The key of one stored variant of a resource.
#[derive(Serialize)]
pub(super) struct EntryKey<'a> {
    resource: [u8; 32],
    /// Each selecting header's name and all its values, joined as one
    /// field value; `None` when the request has none.
    vary: Vec<(&'a str, Option<Vec<u8>>)>,
}

impl<'a> EntryKey<'a> {
    pub(super) fn new(resource: [u8; 32], names: &'a [HeaderName], headers: &HeaderMap) -> Self {
        let vary = names
            .iter()
            .map(|name| {
                let mut values = headers.get_all(name).iter().peekable();
                // One field however many lines, without the optional white
                // space around its commas (RFC 9110 §5.3, §5.6.1).
                let value = values.peek().is_some().then(|| {
                    let mut joined = Vec::new();
                    for (i, item) in values.flat_map(|value| value.as_bytes().split(|b| *b == b',')).enumerate() {
                        if i > 0 {
                            joined.push(b',');
                        }
                        joined.extend_from_slice(item.trim_ascii());
                    }
                    joined
                });
                (name.as_str(), value)
            })
            .collect();
        Self { resource, vary }
    }
}

/// `names` sorted, without repeats.
pub(super) fn normalized(mut names: Vec<HeaderName>) -> Vec<HeaderName> {
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str) -> Target {
        Target::of(&Request::get(uri).header("host", "Shop.Example").body(()).unwrap())
    }

    #[test]
    fn an_origin_has_one_spelling() {
        for same in ["app.test", "App.Test:80", "app.test:443", "app.test.", "user@app.test:80", "app.test:"] {
            assert_eq!(canonical_authority(same), "app.test", "{same}");
        }
        assert_eq!(canonical_authority("app.test:8080"), "app.test:8080");
        assert_eq!(canonical_authority("[::1]:80"), "[::1]");
        assert_eq!(canonical_authority("[::1]:8080"), "[::1]:8080");
        assert_eq!(canonical_authority("[::1]"), "[::1]");
        let on = |host: &str| Target::of(&Request::get("/p").header("host", host).body(()).unwrap());
        assert_eq!(on("app.test:80").bucket(64), on("APP.test").bucket(64));
        assert_eq!(on("app.test").referenced("http://app.test:80/q").map(|t| t.authority), Some("app.test".into()));
    }

    #[test]
    fn the_query_is_sorted_by_name_only() {
        assert_eq!(target("/p?b=2&a=1").resource(), target("/p?a=1&b=2").resource());
        assert_ne!(target("/p?s=a&s=b").resource(), target("/p?s=b&s=a").resource());
        assert_eq!(target("/p?s=a&t=1&s=b").resource(), target("/p?t=1&s=a&s=b").resource());
        assert_ne!(target("/p?a=1").resource(), target("/q?a=1").resource());
        assert_eq!(target("/p").authority, "shop.example");
    }

    #[test]
    fn references_on_the_same_authority_only() {
        let at = target("/a/b?x=1");
        assert_eq!(at.referenced("/c?y=2").map(|t| (t.path, t.query)), Some(("/c".into(), Some("y=2".into()))));
        assert_eq!(at.referenced("http://shop.example/d#f").map(|t| t.path), Some("/d".into()));
        assert_eq!(at.referenced("d").map(|t| t.path), Some("/a/d".into()));
        assert_eq!(at.referenced("https://elsewhere.example/d"), None);
        assert_eq!(at.referenced("//elsewhere.example/d"), None);
    }

    #[test]
    fn every_value_of_a_selecting_header_counts() {
        let names = [header::ACCEPT_LANGUAGE];
        let key = |values: &[&str]| {
            let mut request = Request::get("/");
            for value in values {
                request = request.header("accept-language", *value);
            }
            let request = request.body(()).unwrap();
            let key = EntryKey::new([0; 32], &names, request.headers());
            serde_json::to_string(&key).unwrap()
        };
        assert_ne!(key(&["en", "fr"]), key(&["en", "de"]));
        assert_eq!(key(&["en", "fr"]), key(&["en, fr"]), "one field, however many lines");
        assert_eq!(key(&[" en ,fr"]), key(&["en, fr"]), "white space around commas");
        assert_ne!(key(&[]), key(&[""]));
    }
}
