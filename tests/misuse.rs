//! Calls that would silently never cache, and write paths that could not
//! tell they failed: each is counted in `stats().misconfigured` and logged
//! once at error level, or returned as an `Err`.

mod support;

use cache_runtime::{Cache, Error, cached};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, run};

const DEADLINE: Duration = Duration::from_secs(60);

/// bincode cannot read back what it wrote for this type: the field is
/// skipped when `None`, and bincode has no field names to notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sparse {
    id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

static SPARSE_COMPUTATIONS: AtomicUsize = AtomicUsize::new(0);

#[cached(ttl = 60, prefix = "sparse", cache = cache)]
async fn sparse(cache: &Cache, id: u32) -> Sparse {
    let _ = cache;
    SPARSE_COMPUTATIONS.fetch_add(1, SeqCst);
    Sparse { id, note: None }
}

#[cached(ttl = 60, prefix = "sparse_json", codec = "json", cache = cache)]
async fn sparse_json(cache: &Cache, id: u32) -> Sparse {
    let _ = cache;
    Sparse { id, note: None }
}

#[test]
fn a_type_the_codec_cannot_read_back_is_reported_and_never_stored() {
    run(DEADLINE, async {
        let cache = Cache::builder().build().expect("memory-only cache");
        for _ in 0..3 {
            assert_eq!(sparse(&cache, 1).await, Sparse { id: 1, note: None });
        }
        let counts = *cache.stats().prefix("sparse").expect("counted");
        assert_eq!(SPARSE_COMPUTATIONS.load(SeqCst), 3, "every call computes");
        assert_eq!(counts.misconfigured, 3, "{counts:?}");
        assert_eq!((counts.writes, counts.decode_errors), (0, 0), "nothing stored, so nothing fails to decode");
        // The same type with the JSON codec round-trips and caches.
        sparse_json(&cache, 1).await;
        sparse_json(&cache, 1).await;
        let json = *cache.stats().prefix("sparse_json").expect("counted");
        assert_eq!((json.hits, json.misconfigured), (1, 0), "{json:?}");
    });
}

#[cached(prefix = "no_ttl", cache = cache)]
async fn no_ttl(cache: &Cache, id: u32) -> u32 {
    let _ = cache;
    id
}

#[cached(ttl = 60, prefix = "wants_local", local = true, cache = cache)]
async fn wants_local(cache: &Cache, id: u32) -> u32 {
    let _ = cache;
    id
}

#[test]
fn no_ttl_anywhere_and_a_missing_local_tier_are_counted() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "misuse").build().expect("cache");
        no_ttl(&cache, 1).await;
        no_ttl(&cache, 1).await;
        let counts = *cache.stats().prefix("no_ttl").expect("counted");
        assert_eq!((counts.misconfigured, counts.bypassed, counts.hits), (2, 2, 0), "{counts:?}");
        // Without a local tier the entry still lives in Redis.
        wants_local(&cache, 1).await;
        wants_local(&cache, 1).await;
        let counts = *cache.stats().prefix("wants_local").expect("counted");
        assert_eq!((counts.misconfigured, counts.hits), (2, 1), "{counts:?}");
    });
}

#[cached(ttl = 60, prefix = "profiles", cache = cache)]
async fn profile(cache: &Cache, id: u32) -> String {
    let _ = cache;
    format!("profile {id}")
}

#[test]
fn try_refresh_says_whether_the_new_value_reached_the_cache() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let live = support::patient_cache(&server.url(), "misuse").build().expect("cache");
        let (value, reached) = cache_runtime::try_refresh(profile(&live, 1)).await;
        assert_eq!((value.as_str(), reached), ("profile 1", Ok(())));
        let dead = support::patient_cache(&RedisServer::dead_url(), "misuse").build().expect("cache");
        let (value, reached) = cache_runtime::try_refresh(profile(&dead, 1)).await;
        assert_eq!(value, "profile 1", "the call still returns its value");
        assert!(reached.is_err(), "a write-through that reached no Redis must say so");
        let (_, reached) = cache_runtime::try_refresh(async { 1 }).await;
        assert_eq!(reached, Err(Error::NotCached));
    });
}

#[test]
fn forget_of_a_future_that_awaits_something_else_first_is_an_error() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "misuse").build().expect("cache");
        profile(&cache, 2).await;
        let wrapped = async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            profile(&cache, 2).await
        };
        assert_eq!(cache_runtime::forget(wrapped).await, Err(Error::NotCached));
        let before = cache.stats().total.hits;
        profile(&cache, 2).await;
        assert_eq!(cache.stats().total.hits, before + 1, "the entry was not forgotten");
        assert_eq!(cache_runtime::forget(profile(&cache, 2)).await, Ok(true));
    });
}
