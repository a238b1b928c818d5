//! A response as stored, how it is replayed (`Age`, `x-cache`), and the
//! conditional requests it answers with `304 Not Modified`.

use super::CacheBody;
use super::rules::split_list;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A response as stored: status, end-to-end headers, body, and when it
/// was stored and stops being fresh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    /// Unix time of the store, in ms.
    pub stored_ms: u64,
    /// The `Age` it arrived with, in seconds.
    pub initial_age: u64,
    /// Unix time in ms when its own freshness ends; `None`: the policy's
    /// TTL alone bounds it.
    pub fresh_until_ms: Option<u64>,
    /// The request headers it was selected by: its `Vary` and the layer's.
    pub vary: Vec<String>,
    /// Its `ETag` is the layer's hash of the body, unknown to the origin.
    pub computed_etag: bool,
}

pub(super) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Headers that describe one connection or one encoding of the body, not
/// the response: recomputed or dropped, never replayed.
pub(super) fn is_replayable(name: &HeaderName, connection: &HeaderMap) -> bool {
    const HOP_BY_HOP: [&str; 10] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "age",
    ];
    let named_by_connection = connection
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .any(|listed| listed.eq_ignore_ascii_case(name.as_str()));
    !HOP_BY_HOP.contains(&name.as_str()) && *name != header::SET_COOKIE && !named_by_connection
}

/// A strong validator for a body: its hash.
pub(super) fn etag_of(body: &[u8]) -> String {
    let hash = blake3::hash(body);
    let hex = hash.to_hex();
    format!("\"{}\"", &hex.as_str()[..32])
}

impl StoredResponse {
    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name.as_str()).map(|(_, v)| v.as_slice())
    }

    /// Asks the origin to answer `304` if this response is still current
    /// (RFC 9111 §4.3.1), with the validators the origin gave.
    pub(super) fn add_validators(&self, headers: &mut HeaderMap) {
        let validators = [(header::ETAG, header::IF_NONE_MATCH), (header::LAST_MODIFIED, header::IF_MODIFIED_SINCE)];
        for (validator, condition) in validators {
            if validator == header::ETAG && self.computed_etag {
                continue;
            }
            if let Some(value) = self.header(&validator).and_then(|v| HeaderValue::from_bytes(v).ok()) {
                headers.insert(condition, value);
            }
        }
    }

    /// Whether revalidating can save sending the body again.
    pub(super) fn has_validators(&self) -> bool {
        (!self.computed_etag && self.header(&header::ETAG).is_some()) || self.header(&header::LAST_MODIFIED).is_some()
    }

    /// The stored header fields updated from a `304` (RFC 9111 §3.2): each
    /// field it carries replaces the stored one, except those describing
    /// the stored body, which it did not send.
    pub(super) fn updated_by(&self, not_modified: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        const KEEP: [&str; 6] =
            ["content-length", "content-encoding", "content-md5", "content-range", "etag", "set-cookie"];
        let mut headers = self.headers.clone();
        let replaced: Vec<&HeaderName> = not_modified
            .keys()
            .filter(|name| !KEEP.contains(&name.as_str()) && is_replayable(name, not_modified))
            .collect();
        headers.retain(|(name, _)| !replaced.iter().any(|r| r.as_str() == name));
        for name in replaced {
            for value in not_modified.get_all(name) {
                headers.push((name.as_str().to_owned(), value.as_bytes().to_vec()));
            }
        }
        headers
    }

    /// How old the response is at `now`, in seconds. An origin's `Age`
    /// is the client's to send, up to any number: saturated, not wrapped.
    pub(super) fn age(&self, now: SystemTime) -> u64 {
        self.initial_age.saturating_add(unix_ms(now).saturating_sub(self.stored_ms) / 1000)
    }

    /// Seconds of freshness left (`None`: bounded by the policy only), or
    /// `Err` once stale.
    pub(super) fn remaining(&self, now: SystemTime) -> Result<Option<u64>, ()> {
        match self.fresh_until_ms {
            None => Ok(None),
            Some(until) if until > unix_ms(now) => Ok(Some((until - unix_ms(now)) / 1000)),
            Some(_) => Err(()),
        }
    }

    /// The response to send. `age`: on a hit, the `Age` to add.
    pub(super) fn respond(
        &self,
        outcome: &'static str,
        age: Option<u64>,
        conditions: &Conditions,
    ) -> Response<CacheBody> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let not_modified = status.is_success() && conditions.not_modified(self);
        let range = (status == StatusCode::OK && !not_modified)
            .then(|| conditions.range.as_deref().and_then(|range| byte_range(range, self.body.len())))
            .flatten();
        let mut response = if not_modified {
            let mut response = Response::new(Empty::new().map_err(Into::into).boxed_unsync());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else if let Some((first, last)) = range {
            let part = self.body.slice(first..=last);
            let mut response = Response::new(Full::new(part).map_err(Into::into).boxed_unsync());
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let content_range = format!("bytes {first}-{last}/{}", self.body.len());
            if let Ok(value) = HeaderValue::from_str(&content_range) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            response
        } else {
            let mut response = Response::new(Full::new(self.body.clone()).map_err(Into::into).boxed_unsync());
            *response.status_mut() = status;
            response
        };
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_bytes(value)) else {
                continue;
            };
            // RFC 9110 §15.4.5: a 304 carries what a 200 would for caches,
            // and nothing that describes the body.
            if not_modified && !is_kept_in_304(&name) {
                continue;
            }
            headers.append(name, value);
        }
        if let Some(age) = age.or(Some(self.initial_age).filter(|age| *age > 0)) {
            headers.insert(header::AGE, HeaderValue::from(age));
        }
        headers.insert("x-cache", HeaderValue::from_static(outcome));
        response
    }
}

fn is_kept_in_304(name: &HeaderName) -> bool {
    [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ]
    .contains(name)
}

/// One range of `Range: bytes=...` within a body of `length` bytes, as
/// first and last offsets; `None` for anything else (several ranges, other
/// units, unsatisfiable), which is answered with the whole body.
fn byte_range(range: &str, length: usize) -> Option<(usize, usize)> {
    let spec = range.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') || length == 0 {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let suffix: usize = suffix.parse().ok().filter(|n| *n > 0)?;
            (length.saturating_sub(suffix), length - 1)
        }
        (first, "") => (first.parse().ok()?, length - 1),
        (first, last) => (first.parse().ok()?, last.parse::<usize>().ok()?.min(length - 1)),
    };
    (first <= last && first < length).then_some((first, last))
}

/// A request's `If-None-Match` and `If-Modified-Since`, evaluated by the
/// layer (RFC 9110 §13.2.2) instead of the handler, and its `Range`, served
/// from a stored whole response.
#[derive(Debug, Default)]
pub(super) struct Conditions {
    if_none_match: Option<String>,
    if_modified_since: Option<SystemTime>,
    range: Option<String>,
}

impl Conditions {
    /// Takes the conditions out of `headers`, so that a miss computes the
    /// whole response to store.
    pub(super) fn take(headers: &mut HeaderMap) -> Self {
        let if_none_match = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let if_modified_since = headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let had_none_match = headers.remove(header::IF_NONE_MATCH).is_some();
        headers.remove(header::IF_MODIFIED_SINCE);
        Self { if_none_match: had_none_match.then_some(if_none_match), if_modified_since, range: None }
    }

    /// Serve this request's `Range` from a stored whole response; an
    /// `If-Range` is not evaluated, so with one the whole body is sent.
    pub(super) fn with_range(mut self, headers: &HeaderMap) -> Self {
        if !headers.contains_key(header::IF_RANGE) {
            self.range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        }
        self
    }

    fn not_modified(&self, stored: &StoredResponse) -> bool {
        if let Some(candidates) = &self.if_none_match {
            let Some(etag) = stored.header(&header::ETAG).and_then(|v| std::str::from_utf8(v).ok()) else {
                return false;
            };
            return candidates.trim() == "*" || entity_tags(candidates).any(|tag| weak_eq(tag, etag.trim()));
        }
        let Some(since) = self.if_modified_since else { return false };
        // Without a Last-Modified, the response's Date is when it was
        // last known current (RFC 9110 §13.1.3).
        let last_modified = stored
            .header(&header::LAST_MODIFIED)
            .or_else(|| stored.header(&header::DATE))
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        last_modified.is_some_and(|modified| modified <= since + Duration::from_millis(999))
    }
}

/// The entity tags of an `If-None-Match` list; commas may occur inside one.
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        let start = usize::from(rest.starts_with("W/")) * 2;
        let body = rest.get(start..)?.strip_prefix('"')?;
        let end = body.find('"')? + start + 2;
        let (tag, after) = rest.split_at(end);
        rest = after;
        Some(tag)
    })
}

/// RFC 9110 §8.8.3.2: equal opaque tags, whether weak or not.
fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(headers: &[(&str, &str)]) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec())).collect(),
            body: Bytes::from_static(b"body"),
            stored_ms: unix_ms(SystemTime::now()),
            initial_age: 0,
            fresh_until_ms: None,
            vary: vec![],
            computed_etag: false,
        }
    }

    fn conditions(name: &str, value: &str) -> Conditions {
        let mut headers = HeaderMap::new();
        headers.insert(HeaderName::try_from(name).unwrap(), HeaderValue::from_str(value).unwrap());
        let conditions = Conditions::take(&mut headers);
        assert!(headers.is_empty(), "taken out of the request");
        conditions
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-1", 11), Some((0, 1)));
        assert_eq!(byte_range("bytes=5-", 11), Some((5, 10)));
        assert_eq!(byte_range("bytes=-3", 11), Some((8, 10)));
        assert_eq!(byte_range("bytes=5-100", 11), Some((5, 10)));
        for unserved in ["bytes=0-1,3-4", "items=0-1", "bytes=11-", "bytes=4-2", "bytes=-0", "bytes=x-1"] {
            assert_eq!(byte_range(unserved, 11), None, "{unserved}");
        }
        let mut page = stored(&[]);
        page.body = Bytes::from_static(b"01234567890");
        let conditions = Conditions::default().with_range(&{
            let mut headers = HeaderMap::new();
            headers.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
            headers
        });
        let part = page.respond("hit", Some(0), &conditions);
        assert_eq!(
            (part.status(), &part.headers()["content-range"]),
            (StatusCode::PARTIAL_CONTENT, &HeaderValue::from_static("bytes 0-1/11"))
        );
    }

    #[test]
    fn entity_tags_are_compared_weakly() {
        let tags: Vec<&str> = entity_tags(r#""a", W/"b,c" ,"d""#).collect();
        assert_eq!(tags, [r#""a""#, r#"W/"b,c""#, r#""d""#]);
        let page = stored(&[("etag", r#""b,c""#)]);
        assert!(conditions("if-none-match", r#""x", W/"b,c""#).not_modified(&page));
        assert!(conditions("if-none-match", "*").not_modified(&page));
        assert!(!conditions("if-none-match", r#""x""#).not_modified(&page));
        assert!(!conditions("if-none-match", "*").not_modified(&stored(&[])), "no validator, no 304");
    }

    #[test]
    fn if_modified_since_and_its_precedence() {
        let page = stored(&[("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"), ("etag", "\"v1\"")]);
        assert!(conditions("if-modified-since", "Tue, 01 Dec 2026 10:00:00 GMT").not_modified(&page));
        assert!(!conditions("if-modified-since", "Tue, 01 Dec 2026 09:59:59 GMT").not_modified(&page));
        let mut both = HeaderMap::new();
        both.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"v0\""));
        both.insert(header::IF_MODIFIED_SINCE, HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"));
        assert!(!Conditions::take(&mut both).not_modified(&page), "If-None-Match decides when present");
    }

    #[test]
    fn a_304_from_the_origin_updates_what_it_carries() {
        let page = stored(&[("etag", "\"v1\""), ("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")]);
        let mut origin = HeaderMap::new();
        for (name, value) in [("x-a", "3"), ("etag", "\"v2\""), ("content-length", "0"), ("cache-control", "max-age=9")]
        {
            origin.append(HeaderName::try_from(name).unwrap(), HeaderValue::from_static(value));
        }
        let updated = page.updated_by(&origin);
        let get = |name: &str| updated.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_slice()).collect::<Vec<_>>();
        assert_eq!(get("x-a"), [b"3"]);
        assert_eq!(get("etag"), [b"\"v1\""], "the stored body's validator stays");
        assert_eq!(get("cache-control"), [b"max-age=9"]);
        assert_eq!(get("content-type"), [b"text/plain"]);
        assert!(get("content-length").is_empty());
        let mut request = HeaderMap::new();
        page.add_validators(&mut request);
        assert_eq!(request["if-none-match"], "\"v1\"");
    }

    #[test]
    fn a_304_keeps_the_validators_and_drops_the_body() {
        let page = stored(&[("etag", "\"v1\""), ("content-type", "text/plain"), ("cache-control", "max-age=60")]);
        let response = page.respond("hit", Some(3), &conditions("if-none-match", "\"v1\""));
        assert_eq!(response.status(), 304);
        assert_eq!(response.headers()["etag"], "\"v1\"");
        assert_eq!(response.headers()["age"], "3");
        assert!(!response.headers().contains_key("content-type"));
        let full = page.respond("hit", Some(3), &Conditions::default());
        assert_eq!(
            (full.status(), &full.headers()["content-type"]),
            (StatusCode::OK, &HeaderValue::from_static("text/plain"))
        );
    }
}
