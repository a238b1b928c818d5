//! Deployments beyond one plain TCP server: an ACL user limited to the
//! application's keys, a Unix socket, and (feature `tls`) TLS with a
//! private CA, mutual TLS, and a server certificate the client must refuse.

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

/// ACL user `shop-app` (password `s3cret`), limited to the keys under
/// `shop:`, with `extra` rules.
fn create_shop_user(server: &RedisServer, extra: &[&str]) {
    let mut rules = vec!["SETUSER", "shop-app", "on", ">s3cret", "resetkeys", "~shop:*"];
    rules.extend_from_slice(extra);
    rules.push("+@all");
    let _: () = redis::cmd("ACL").arg(&rules).query(&mut server.conn()).expect("create the ACL user");
}

#[test]
fn an_acl_user_limited_to_the_applications_keys_is_enough() {
    let server = RedisServer::start();
    create_shop_user(&server, &[]);
    run(DEADLINE, async {
        let cache = cache_at(format!("redis://shop-app:s3cret@127.0.0.1:{}", server.port()));
        miss_hit_invalidate(&cache).await;
    });
    // Every key the cache wrote is inside the user's pattern.
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut server.conn()).unwrap();
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("shop:")), "{keys:?}");
}

#[cached(ttl = 60, prefix = "orders_local", local = true, cache = cache)]
async fn local_order(cache: &Cache, id: u64) -> String {
    format!("order {id}")
}

#[test]
fn an_acl_user_with_the_prefix_channels_gets_the_local_tier() {
    let server = RedisServer::start();
    create_shop_user(&server, &["resetchannels", "&shop:*"]);
    run(DEADLINE, async {
        let url = format!("redis://shop-app:s3cret@127.0.0.1:{}", server.port());
        let cache = support::patient_cache(&url, "shop").local(100).build().expect("valid cache settings");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.stats().total.local_hits == 0 {
            assert_eq!(local_order(&cache, 1).await, "order 1");
            assert!(std::time::Instant::now() < deadline, "the channel never came up for the ACL user");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cache.invalidate("orders_local").await.expect("invalidate");
    });
}

#[test]
fn a_wrong_password_is_a_clear_error_and_the_app_runs_uncached() {
    let server = RedisServer::start();
    create_shop_user(&server, &[]);
    run(DEADLINE, async {
        let cache = cache_at(format!("redis://shop-app:wrong@127.0.0.1:{}", server.port()));
        let calls = AtomicUsize::new(0);
        assert_eq!(order(&cache, &calls, 1).await, "order 1");
        assert_eq!(order(&cache, &calls, 1).await, "order 1");
        assert_eq!(calls.load(SeqCst), 2, "uncached, but answered");
        let err = cache.invalidate("customers").await.unwrap_err().to_string();
        assert!(err.contains("refused the credentials"), "{err}");
        assert!(!err.contains("wrong"), "the password stays out of messages: {err}");
    });
}

#[test]
fn a_unix_socket_works_like_tcp() {
    let server = UnixRedis::start();
    run(DEADLINE, async {
        let cache = cache_at(server.url());
        miss_hit_invalidate(&cache).await;
    });
}

/// Two calls and an invalidation, when Redis cannot be used: every call
/// computes, and the write path learns that Redis was not reached.
#[cfg(feature = "tls")]
async fn computes_without_redis(cache: &Cache) {
    let calls = AtomicUsize::new(0);
    assert_eq!(order(cache, &calls, 1).await, "order 1");
    assert_eq!(order(cache, &calls, 1).await, "order 1");
    assert_eq!(calls.load(SeqCst), 2, "nothing was cached");
    assert!(cache.invalidate("customers").await.is_err(), "the write path hears of it");
    assert!(cache.stats().total.connection_errors > 0, "{:?}", cache.stats().total);
}

#[cfg(feature = "tls")]
fn tls_cache(url: String, certs: &support::Certificates) -> cache_runtime::CacheBuilder {
    support::patient_cache(&url, "shop").tls_root_certificate(certs.read("ca.crt"))
}

#[cfg(feature = "tls")]
#[test]
fn tls_with_a_private_ca() {
    let certs = support::Certificates::generate("private");
    let server = support::TlsRedis::start(&certs, false);
    run(DEADLINE, async {
        miss_hit_invalidate(&tls_cache(server.url(), &certs).build().expect("valid settings")).await;
        // Without the CA, the system's roots do not vouch for this server.
        let untrusted = support::patient_cache(&server.url(), "shop").build().expect("valid settings");
        computes_without_redis(&untrusted).await;
    });
}

#[cfg(feature = "tls")]
#[test]
fn mutual_tls_needs_the_client_certificate() {
    let certs = support::Certificates::generate("mutual");
    let server = support::TlsRedis::start(&certs, true);
    run(DEADLINE, async {
        let anonymous = tls_cache(server.url(), &certs).build().expect("valid settings");
        computes_without_redis(&anonymous).await;
        let known = tls_cache(server.url(), &certs)
            .tls_client_certificate(certs.read("client.crt"), certs.read("client.key"))
            .build()
            .expect("valid settings");
        miss_hit_invalidate(&known).await;
    });
}

#[cfg(feature = "tls")]
#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let (ours, theirs) = (support::Certificates::generate("ours"), support::Certificates::generate("theirs"));
    let server = support::TlsRedis::start(&theirs, false);
    run(DEADLINE, async {
        computes_without_redis(&tls_cache(server.url(), &ours).build().expect("valid settings")).await;
    });
}

#[cfg(feature = "tls")]
#[test]
fn certificates_for_a_plain_url_are_a_configuration_error() {
    let certs = support::Certificates::generate("plain");
    let err = tls_cache("redis://127.0.0.1:6399".to_owned(), &certs).build().unwrap_err();
    assert!(err.to_string().contains("not rediss://"), "{err}");
}

#[cfg(feature = "sentinel")]
#[test]
fn behind_sentinel_the_cache_follows_a_failover() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let master = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    let sentinel = support::Sentinel::start(master.port());
    run(Duration::from_secs(90), async {
        let cache = Cache::builder()
            .sentinel([sentinel.url()], support::Sentinel::MASTER_NAME)
            .key_prefix("shop")
            .command_timeout(Duration::from_millis(500))
            .connect_timeout(Duration::from_millis(500))
            .build()
            .expect("valid cache settings");
        miss_hit_invalidate(&cache).await;

        // Callers keep calling through the failover.
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..8u64)
            .map(|task| {
                let (cache, stop, answered) = (cache.clone(), stop.clone(), answered.clone());
                tokio::spawn(async move {
                    let calls = AtomicUsize::new(0);
                    let mut id = task;
                    while !stop.load(SeqCst) {
                        id = (id + 7) % 20;
                        assert_eq!(order(&cache, &calls, id).await, format!("order {id}"));
                        answered.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sentinel = &sentinel;
        let new_master = replica.port();
        tokio::task::block_in_place(|| {
            sentinel.fail_over();
            sentinel.until(Duration::from_secs(30), "the failover", |_| sentinel.master_port() == Some(new_master));
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, SeqCst);
        for caller in callers {
            caller.await.expect("no caller failed");
        }
        println!("{} calls answered through the failover", answered.load(SeqCst));

        // Caching resumes on the new master.
        let calls = AtomicUsize::new(0);
        assert_eq!(order(&cache, &calls, 1_000).await, "order 1000");
        assert_eq!(order(&cache, &calls, 1_000).await, "order 1000");
        assert_eq!(calls.load(SeqCst), 1, "the second call is a hit");
        cache.invalidate("customers").await.expect("invalidate reaches the new master");
    });
    let keys: Vec<String> = redis::cmd("KEYS").arg("shop:orders:*").query(&mut replica.conn()).expect("KEYS");
    assert!(!keys.is_empty(), "entries were written to the new master");
}
