//! The process-wide cache: calls before `init`, `init` itself, and the
//! free functions. One test, because `init` happens once per process.

mod support;

use cache_runtime::{Cache, Error, cached};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, run};

static CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(ttl = 60, prefix = "greeting")]
async fn greeting(name: String) -> String {
    CALLS.fetch_add(1, SeqCst);
    format!("hello, {name}")
}

#[test]
fn before_init_calls_compute_and_after_init_they_cache() {
    let server = RedisServer::start();
    run(Duration::from_secs(30), async {
        assert_eq!(cache_runtime::invalidate("greeting").await, Err(Error::NotInitialized));
        assert_eq!(greeting("ada".into()).await, "hello, ada");
        assert_eq!(greeting("ada".into()).await, "hello, ada");
        assert_eq!(CALLS.load(SeqCst), 2, "no cache before init: every call computes");
        assert_eq!(cache_runtime::stats(), Default::default());

        let cache = Cache::builder()
            .url(server.url())
            .key_prefix("global")
            .command_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        cache_runtime::init(cache.clone()).unwrap();
        assert_eq!(cache_runtime::init(cache), Err(Error::AlreadyInitialized));

        assert_eq!(greeting("ada".into()).await, "hello, ada");
        assert_eq!(greeting("ada".into()).await, "hello, ada");
        assert_eq!(CALLS.load(SeqCst), 3, "after init the second call is a hit");
        assert_eq!(cache_runtime::stats().total.hits, 1);

        let version = cache_runtime::invalidate("greeting").await.unwrap();
        assert!(version > 1);
        assert_eq!(greeting("ada".into()).await, "hello, ada");
        assert_eq!(CALLS.load(SeqCst), 4, "invalidate makes the entry stale");
        assert_eq!(cache_runtime::invalidate("greeting").await, Ok(version + 1));
    });
    let keys: Vec<String> = redis::cmd("KEYS").arg("global:greeting:*").query(&mut server.conn()).unwrap();
    assert!(keys.iter().any(|k| k == "global:greeting:{greeting}#v"), "{keys:?}");
}
