//! Redis URLs: parsing them, and showing them with every secret masked.

use crate::error::Error;
use redis::IntoConnectionInfo;

pub(super) fn parse_url(url: &str) -> Result<redis::ConnectionInfo, Error> {
    let refuse = |reason: String| Error::InvalidUrl { url: redact_url(url), reason };
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("redis" | "redis+unix" | "unix") => {}
        #[cfg(feature = "tls")]
        Some("rediss") => {}
        #[cfg(not(feature = "tls"))]
        Some("rediss") => {
            return Err(refuse("TLS (`rediss://`) needs cache-runtime's `tls` feature".to_owned()));
        }
        // Named only when masking would show it: the text before `://`
        // of a malformed URL can be part of a password.
        Some(other) if SHOWN_SCHEMES.contains(&other) => {
            return Err(refuse(format!("unknown scheme `{other}`, expected redis:// or redis+unix://")));
        }
        Some(_) => return Err(refuse("unknown scheme, expected redis:// or redis+unix://".to_owned())),
        None => return Err(refuse("expected a URL such as redis://127.0.0.1:6379".to_owned())),
    }
    url.into_connection_info().map_err(|e| refuse(e.to_string()))
}

/// Where a URL's authority starts: after a known `scheme:` and the
/// slashes that follow, else at 0; and whether it is a `scheme://` URL.
fn authority_start(url: &str) -> (usize, bool) {
    let Some((scheme, rest)) = url.split_once(':') else { return (0, false) };
    if !SHOWN_SCHEMES.contains(&scheme) {
        return (0, false);
    }
    let slashes = rest.bytes().take_while(|&b| b == b'/').count();
    (scheme.len() + 1 + slashes, slashes == 2)
}

/// Query parameters whose values are shown as given; every other value
/// (`pass`, `password`, anything misspelt or percent-encoded) is masked.
const SHOWN_PARAMETERS: [&str; 4] = ["db", "protocol", "user", "insecure"];

/// Schemes shown in messages. Any other text before a `:` may be part of
/// a password in a malformed URL (`secret@host`), so it is masked.
const SHOWN_SCHEMES: [&str; 10] =
    ["redis", "rediss", "redis+unix", "unix", "valkey", "valkeys", "valkey+unix", "http", "https", "tcp"];

/// The URL with anything that may be a secret replaced by `***`, for
/// messages. Works on the text, not on a parse, so a malformed URL is
/// masked as well as a good one: everything between the authority's start
/// (after a known `scheme:` and its slashes, else the very start) and the
/// last `@`, except a user name before a `:` in a `scheme://` URL; and the
/// value of every query parameter not known to be harmless. Where readings
/// disagree (a `?` or `@` inside a password), both are masked.
pub(crate) fn redact_url(url: &str) -> String {
    let (authority, well_formed) = authority_start(url);
    let mut masked: Vec<(usize, usize)> = Vec::new();
    if let Some(at) = url.rfind('@').filter(|&at| at >= authority) {
        let credentials = &url[authority..at];
        let from = match credentials.find(':') {
            Some(colon) if well_formed => authority + colon + 1,
            _ => authority,
        };
        masked.push((from, at));
    }
    if let Some(question) = url[authority..].find('?') {
        let mut position = authority + question + 1;
        for parameter in url[position..].split('&') {
            let end = position + parameter.len();
            match parameter.split_once('=') {
                Some((name, _)) if SHOWN_PARAMETERS.contains(&name) => {}
                Some((name, _)) => masked.push((position + name.len() + 1, end)),
                None => masked.push((position, end)),
            }
            position = end + 1;
        }
    }
    masked.retain(|(from, to)| from < to);
    masked.sort_unstable();
    let mut out = String::with_capacity(url.len());
    let mut shown = 0;
    for (from, to) in masked {
        if to <= shown {
            continue;
        }
        if from > shown {
            out.push_str(&url[shown..from]);
            out.push_str("***");
        } else if !out.ends_with("***") {
            out.push_str("***");
        }
        shown = to;
    }
    out.push_str(&url[shown..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CacheBuilder;

    #[test]
    fn bad_urls_are_clear_errors() {
        for (url, needle) in [
            ("http://x", "unknown scheme `http`"),
            ("localhost:6379", "expected a URL"),
            #[cfg(not(feature = "tls"))]
            ("rediss://x", "`tls` feature"),
            ("redis://:hunter2@host:notaport", "invalid Redis URL `redis://:***@host:notaport`"),
        ] {
            let err = CacheBuilder::default().url(url).build().unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("hunter2"), "password leaked: {err}");
        }
    }

    #[test]
    fn urls_are_redacted_whatever_their_shape() {
        for (url, shown) in [
            ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
            ("redis://:pw@host", "redis://:***@host"),
            ("redis//:pw@host:6379/0", "***@host:6379/0"),
            ("redis:pw@host", "redis:***@host"),
            ("pw@host", "***@host"),
            ("redis://host:6379", "redis://host:6379"),
            ("redis+unix:///tmp/r.sock?db=2&pass=pw", "redis+unix:///tmp/r.sock?db=2&pass=***"),
            ("redis+unix:///tmp/r.sock?%70ass=pw&user=me", "redis+unix:///tmp/r.sock?%70ass=***&user=me"),
            ("redis://host/0?pass=se@cret", "redis://***"),
            ("redis://:pa?ss@host", "redis://:***"),
            ("redis://:p@ss@host", "redis://:***@host"),
            ("redis:ab//cd@host", "redis:***@host"),
            ("Q:1Y=Xd:@host", "***@host"),
            ("redis:/:pw@host", "redis:/***@host"),
            ("redis://:x?db=1@host", "redis://:***@host"),
            ("user:pw@host", "***@host"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
