//! Deployments beyond one plain TCP server: an ACL user limited to the
//! application's keys, and a Unix socket.

mod support;

use cache_runtime::{Cache, cached};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, UnixRedis, run};

const DEADLINE: Duration = Duration::from_secs(30);

#[cached(ttl = 60, prefix = "orders", tags("customers"), skip(calls), cache = cache)]
async fn order(cache: &Cache, calls: &AtomicUsize, id: u64) -> String {
    calls.fetch_add(1, SeqCst);
    format!("order {id}")
}

fn cache_at(url: String) -> Cache {
    support::patient_cache(&url, "shop").build().expect("valid cache settings")
}

async fn miss_hit_invalidate(cache: &Cache) {
    let calls = AtomicUsize::new(0);
    assert_eq!(order(cache, &calls, 1).await, "order 1");
    assert_eq!(order(cache, &calls, 1).await, "order 1");
    assert_eq!(calls.load(SeqCst), 1, "the second call is a hit");
    cache.invalidate("customers").await.expect("invalidate through this connection");
    order(cache, &calls, 1).await;
    assert_eq!(calls.load(SeqCst), 2, "the tag invalidated the entry");
    assert_eq!(cache.stats().total.errors(), 0, "{:?}", cache.stats().total);
}

#[test]
fn an_acl_user_limited_to_the_applications_keys_is_enough() {
    let server = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "shop-app", "on", ">s3cret", "resetkeys", "~shop:*", "+@all"])
        .query(&mut server.conn())
        .expect("create the ACL user");
    run(DEADLINE, async {
        let cache = cache_at(format!("redis://shop-app:s3cret@127.0.0.1:{}", server.port()));
        miss_hit_invalidate(&cache).await;
    });
    // Every key the cache wrote is inside the user's pattern.
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut server.conn()).unwrap();
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("shop:")), "{keys:?}");
}

#[test]
fn a_unix_socket_works_like_tcp() {
    let server = UnixRedis::start();
    run(DEADLINE, async {
        let cache = cache_at(server.url());
        miss_hit_invalidate(&cache).await;
    });
}
