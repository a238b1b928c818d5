//! What HTTP allows the layer to store and to reuse: the response's
//! storability and freshness (RFC 9111 §3, §4.2, through
//! `http-cache-semantics`), and the request's own `Cache-Control`.

use http::header::{self, HeaderMap, HeaderName};
use http::{StatusCode, request, response};
use http_cache_semantics::{CacheOptions, CachePolicy};
use std::time::{Duration, SystemTime};

/// RFC 9110 §15.1's heuristically cacheable statuses, less `206` (a part is
/// never the whole resource) and `308` (left to explicit freshness, as the
/// issue that introduced this list asks).
pub(super) const DEFAULT_STATUSES: [u16; 10] = [200, 203, 204, 300, 301, 404, 405, 410, 414, 501];

/// The directives of every `Cache-Control` value of `headers`, names in
/// lower case, quoted values unquoted.
pub(super) fn directives(headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for item in split_list(value) {
            let (name, argument) = match item.split_once('=') {
                Some((name, argument)) => (name, Some(argument.trim().trim_matches('"').to_owned())),
                None => (item, None),
            };
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                out.push((name, argument));
            }
        }
    }
    out
}

/// The items of a comma-separated field value; a comma inside a quoted
/// string does not separate.
pub(super) fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&value[start..]);
    items.into_iter().map(str::trim).filter(|item| !item.is_empty())
}

fn has(directives: &[(String, Option<String>)], name: &str) -> bool {
    directives.iter().any(|(n, _)| n == name)
}

fn seconds(directives: &[(String, Option<String>)], name: &str) -> Option<u64> {
    directives.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// The header names a response varies on, lower case; `None` for `Vary: *`.
pub(super) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        // An unreadable Vary cannot be honoured: treat it as `*`.
        let value = value.to_str().ok()?;
        for name in split_list(value) {
            if name == "*" {
                return None;
            }
            names.push(HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()?);
        }
    }
    Some(names)
}

/// Whether `Age` is absent, or one field line of digits.
fn valid_age(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::AGE).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(value), None) => {
            let value = value.as_bytes();
            !value.is_empty() && value.iter().all(u8::is_ascii_digit)
        }
        (Some(_), Some(_)) => false,
    }
}

/// What the client asked of the cache.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RequestDirectives {
    /// Neither read nor store.
    pub no_store: bool,
    /// Recompute (`no-cache`, `Pragma: no-cache`, `max-age=0`).
    pub no_cache: bool,
    max_age: Option<u64>,
    min_fresh: Option<u64>,
}

impl RequestDirectives {
    pub(super) fn of(headers: &HeaderMap) -> Self {
        let directives = directives(headers);
        let pragma_no_cache = !headers.contains_key(header::CACHE_CONTROL)
            && headers.get_all(header::PRAGMA).iter().any(|v| v.to_str().is_ok_and(|v| v.contains("no-cache")));
        let max_age = seconds(&directives, "max-age");
        Self {
            no_store: has(&directives, "no-store"),
            no_cache: has(&directives, "no-cache") || pragma_no_cache || max_age == Some(0),
            max_age,
            min_fresh: seconds(&directives, "min-fresh"),
        }
    }

    /// Whether an entry of this age, fresh for `remaining` more seconds
    /// (`None`: for the policy TTL), satisfies the request.
    pub(super) fn accepts(&self, age: u64, remaining: Option<u64>) -> bool {
        self.max_age.is_none_or(|max| age <= max)
            && self.min_fresh.is_none_or(|min| remaining.is_none_or(|remaining| remaining >= min))
    }
}

/// How long a storable response stays fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Freshness {
    /// From the response's own `s-maxage`, `max-age` or `Expires`, less its
    /// age; `None`: it has none, the policy TTL decides.
    pub lifetime: Option<Duration>,
    /// The `Age` the response arrived with, in seconds.
    pub initial_age: u64,
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotStored {
    /// A status outside the configured list, or one RFC 9111 never stores.
    Status,
    /// `private`, `no-store`, `no-cache`, `Pragma: no-cache`, `Set-Cookie`,
    /// `Vary: *`, a part of a resource.
    Forbidden,
    /// Its own freshness is already over.
    Expired,
}

/// Whether `response`, the answer to `request`, may be stored and for how
/// long. `statuses`: those stored without explicit freshness.
pub(super) fn storable(
    request: &request::Parts,
    response: &response::Parts,
    statuses: &[u16],
    now: SystemTime,
) -> Result<Freshness, NotStored> {
    let status = response.status;
    if status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStored::Forbidden);
    }
    if !valid_age(&response.headers) {
        // RFC 9111 §5.1: an Age that is not one non-negative integer cannot
        // be trusted, so neither can the response's freshness.
        return Err(NotStored::Expired);
    }
    let cc = directives(&response.headers);
    let pragma_no_cache = !response.headers.contains_key(header::CACHE_CONTROL)
        && response.headers.get_all(header::PRAGMA).iter().any(|v| v.to_str().is_ok_and(|v| v.contains("no-cache")));
    if ["private", "no-store", "no-cache"].iter().any(|d| has(&cc, d))
        || pragma_no_cache
        || response.headers.contains_key(header::SET_COOKIE)
        || vary_names(&response.headers).is_none()
    {
        return Err(NotStored::Forbidden);
    }
    let options = CacheOptions {
        shared: true,
        // No heuristic freshness: without explicit freshness the
        // application's TTL applies.
        cache_heuristic: 0.0,
        immutable_min_time_to_live: Duration::ZERO,
        ignore_cargo_cult: false,
    };
    let explicit = has(&cc, "max-age") || has(&cc, "s-maxage") || response.headers.contains_key(header::EXPIRES);
    if !explicit && !statuses.contains(&status.as_u16()) {
        return Err(NotStored::Status);
    }
    // What the crate is shown: directive names in lower case (it compares
    // them as sent), and, for a final status with explicit freshness that
    // it does not list as understood (a 500 with `max-age`), a 200, since
    // RFC 9111 §3 lets any final status with explicit freshness be stored.
    let mut shown = response.clone();
    if explicit && !status.is_informational() && status != StatusCode::NOT_MODIFIED && !has(&cc, "must-understand") {
        shown.status = StatusCode::OK;
    }
    if response.headers.get_all(header::CACHE_CONTROL).iter().any(|v| v.as_bytes().iter().any(u8::is_ascii_uppercase)) {
        let lowered = cc
            .iter()
            .map(|(name, value)| match value {
                Some(value) => format!("{name}=\"{value}\""),
                None => name.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        shown.headers.remove(header::CACHE_CONTROL);
        if let Ok(value) = http::HeaderValue::from_str(&lowered) {
            shown.headers.insert(header::CACHE_CONTROL, value);
        }
    }
    let policy = CachePolicy::new_options(request, &shown, now, options);
    if !policy.is_storable() {
        return Err(NotStored::Status);
    }
    let initial_age = policy.age(now).as_secs();
    if !explicit {
        return Ok(Freshness { lifetime: None, initial_age });
    }
    let ttl = policy.time_to_live(now);
    if ttl.is_zero() {
        return Err(NotStored::Expired);
    }
    Ok(Freshness { lifetime: Some(ttl), initial_age })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};

    fn check(response: Response<()>) -> Result<Freshness, NotStored> {
        let request = Request::get("http://example.test/p").body(()).unwrap().into_parts().0;
        storable(&request, &response.into_parts().0, &DEFAULT_STATUSES, SystemTime::now())
    }

    fn with(name: &str, value: &str) -> Response<()> {
        Response::builder().header(name, value).body(()).unwrap()
    }

    #[test]
    fn what_is_never_stored() {
        assert_eq!(check(Response::new(())), Ok(Freshness { lifetime: None, initial_age: 0 }));
        for (name, value) in [
            ("cache-control", "max-age=60, Private"),
            ("cache-control", "no-store"),
            ("cache-control", "no-cache"),
            ("cache-control", r#"no-cache="set-cookie""#),
            ("pragma", "no-cache"),
            ("set-cookie", "session=1"),
            ("vary", "accept, *"),
        ] {
            assert_eq!(check(with(name, value)), Err(NotStored::Forbidden), "{name}: {value}");
        }
        for status in [201, 202, 206, 302, 500, 503] {
            let response = Response::builder().status(status).body(()).unwrap();
            assert!(check(response).is_err(), "{status}");
        }
        let missing = Response::builder().status(404).body(()).unwrap();
        assert!(check(missing).is_ok());
    }

    #[test]
    fn explicit_freshness_bounds_the_lifetime() {
        let lifetime = |r| check(r).ok().and_then(|f| f.lifetime).map(|d| d.as_secs());
        assert_eq!(lifetime(with("cache-control", "max-age=60")), Some(60));
        let shared = Response::builder().header("cache-control", "max-age=60, s-maxage=5").body(()).unwrap();
        assert_eq!(lifetime(shared), Some(5));
        let aged = Response::builder().header("cache-control", "max-age=60").header("age", "50").body(()).unwrap();
        assert_eq!(lifetime(aged), Some(10));
        assert_eq!(check(with("cache-control", "max-age=0")), Err(NotStored::Expired));
        for age in ["abc", "-7200", "7200.0", "7200,0", "0, 0", "7200;foo=bar", ""] {
            let odd = Response::builder().header("cache-control", "max-age=60").header("age", age).body(()).unwrap();
            assert_eq!(check(odd), Err(NotStored::Expired), "Age: {age}");
        }
        let twice = Response::builder().header("age", "0").header("age", "0").body(()).unwrap();
        assert_eq!(check(twice), Err(NotStored::Expired), "two Age lines");
        assert_eq!(check(with("expires", "Thu, 01 Jan 1970 00:00:00 GMT")), Err(NotStored::Expired));
        let redirect = Response::builder().status(302).header("cache-control", "max-age=9").body(()).unwrap();
        assert_eq!(lifetime(redirect), Some(9), "explicit freshness makes a 302 storable");
        let error = Response::builder().status(503).header("cache-control", "MAX-AGE=9").body(()).unwrap();
        assert_eq!(lifetime(error), Some(9), "and a 503, directive names in any case");
    }

    #[test]
    fn request_directives() {
        let of = |value: &str| RequestDirectives::of(&with("cache-control", value).into_parts().0.headers);
        assert!(of("no-store").no_store);
        assert!(of("no-cache").no_cache && of("max-age=0").no_cache);
        assert!(of("max-age=10").accepts(10, None) && !of("max-age=10").accepts(11, None));
        assert!(!of("min-fresh=10").accepts(0, Some(5)) && of("min-fresh=10").accepts(0, None));
        let pragma = with("pragma", "no-cache").into_parts().0.headers;
        assert!(RequestDirectives::of(&pragma).no_cache);
    }

    /// What `http-cache-semantics` costs, printed rather than asserted:
    /// `cargo test --release -p cache-runtime --features tower --lib
    /// cost_per -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing, meaningful in release builds"]
    fn cost_per_hit_and_per_miss() {
        use http_cache_semantics::BeforeRequest;
        let request = Request::get("http://shop.example/products?page=2")
            .header("accept", "application/json")
            .header("accept-language", "en")
            .header("cookie", "session=alice")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let response = Response::builder()
            .header("content-type", "application/json")
            .header("cache-control", "public, max-age=60")
            .header("etag", "\"0123456789abcdef\"")
            .header("vary", "Accept-Language")
            .header("date", httpdate::fmt_http_date(SystemTime::now()))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let rounds = 100_000u32;
        let time = |f: &mut dyn FnMut()| {
            let started = std::time::Instant::now();
            for _ in 0..rounds {
                f();
            }
            started.elapsed() / rounds
        };
        let now = SystemTime::now();
        let mut sink = 0u64;
        let store = time(&mut || {
            sink += storable(&request, &response, &DEFAULT_STATUSES, now).map_or(0, |f| f.initial_age);
        });
        let policy = CachePolicy::new_options(&request, &response, now, CacheOptions::default());
        let crate_hit = time(&mut || {
            let policy = CachePolicy::new_options(&request, &response, now, CacheOptions::default());
            sink += u64::from(matches!(policy.before_request(&request, now), BeforeRequest::Fresh(_)));
        });
        let crate_hit_kept = time(&mut || {
            sink += u64::from(matches!(policy.before_request(&request, now), BeforeRequest::Fresh(_)));
        });
        let layer_hit = time(&mut || {
            let directives = RequestDirectives::of(&request.headers);
            sink += u64::from(directives.accepts(3, Some(57)));
        });
        println!(
            "per miss, storable() through http-cache-semantics: {store:?}\n\
             per hit, CachePolicy rebuilt + before_request: {crate_hit:?}\n\
             per hit, CachePolicy kept + before_request: {crate_hit_kept:?}\n\
             per hit, the layer's own request checks: {layer_hit:?}  ({sink})"
        );
    }

    #[test]
    fn vary_in_its_forms() {
        let headers = |values: &[&str]| {
            let mut response = Response::builder();
            for value in values {
                response = response.header("vary", *value);
            }
            response.body(()).unwrap().into_parts().0.headers
        };
        let names = vary_names(&headers(&["Accept-Language,  COOKIE", "x-a"])).unwrap();
        assert_eq!(names, ["accept-language", "cookie", "x-a"]);
        assert_eq!(vary_names(&headers(&["x-a", " * "])), None);
        assert_eq!(vary_names(&headers(&[",,"])), Some(vec![]));
    }
}
