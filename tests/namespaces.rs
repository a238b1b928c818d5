//! Namespace versions, tags, per-entry forget/refresh and the programmatic
//! API, against real Redis servers and a second OS process.

mod support;

use cache_runtime::{Cache, Error, Policy, cached};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{Db, RedisServer, Topology, entry_keys, run};

const DEADLINE: Duration = Duration::from_secs(30);

fn cache_for(url: &str) -> Cache {
    support::patient_cache(url, "shop").build().expect("valid cache settings")
}

#[cached(ttl = 600, prefix = "product_page", tags("products", "categories"), skip(db), cache = cache)]
async fn product_page(cache: &Cache, db: &Db, id: u64) -> String {
    format!("product {id} costs {}", db.read())
}

// --- two processes -------------------------------------------------------

/// When re-executed with CACHE_TEST_ROLE=invalidate, this test binary acts
/// as the other process: it invalidates a namespace and exits.
#[test]
fn helper_process() {
    let (Ok(role), Ok(url)) = (std::env::var("CACHE_TEST_ROLE"), std::env::var("CACHE_TEST_URL")) else { return };
    run(DEADLINE, async {
        let cache = cache_for(&url);
        match role.as_str() {
            "invalidate" => {
                let namespace = std::env::var("CACHE_TEST_NAMESPACE").expect("namespace");
                let version = cache.invalidate(&namespace).await.expect("invalidate from the other process");
                println!("invalidated {namespace} to version {version}");
            }
            other => panic!("unknown role {other}"),
        }
    });
}

fn invalidate_from_another_process(url: &str, namespace: &str) {
    let output = Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", "helper_process", "--nocapture", "--test-threads=1"])
        .env("CACHE_TEST_ROLE", "invalidate")
        .env("CACHE_TEST_URL", url)
        .env("CACHE_TEST_NAMESPACE", namespace)
        .output()
        .expect("spawn the helper process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "helper failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("invalidated {namespace} to version")), "{stdout}");
}

fn an_invalidate_in_another_process_is_seen_at_once(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(100);
        assert_eq!(product_page(&cache, &db, 1).await, "product 1 costs 100");
        assert_eq!(product_page(&cache, &db, 1).await, "product 1 costs 100");
        assert_eq!(db.reads.load(SeqCst), 1);

        db.price.store(90, SeqCst);
        invalidate_from_another_process(&server.url(), "products");
        assert_eq!(product_page(&cache, &db, 1).await, "product 1 costs 90", "read-your-writes across processes");
        assert_eq!(db.reads.load(SeqCst), 2);
        assert_eq!(product_page(&cache, &db, 1).await, "product 1 costs 90");
        assert_eq!(db.reads.load(SeqCst), 2, "the new value is cached again");
        assert_eq!(cache.stats().total.stale, 1);
    });
}

fn any_tag_invalidates_and_unrelated_namespaces_do_not(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(1);
        product_page(&cache, &db, 1).await;
        product_page(&cache, &db, 1).await;
        assert_eq!(db.reads.load(SeqCst), 1);

        cache.invalidate("orders").await.unwrap();
        product_page(&cache, &db, 1).await;
        assert_eq!(db.reads.load(SeqCst), 1, "an unrelated namespace changes nothing");

        for (namespace, reads) in [("products", 2), ("categories", 3), ("product_page", 4)] {
            cache.invalidate(namespace).await.unwrap();
            product_page(&cache, &db, 1).await;
            product_page(&cache, &db, 1).await;
            assert_eq!(db.reads.load(SeqCst), reads, "invalidating {namespace} makes the entry stale");
        }
    });
}

/// Reads the price, then takes 300 ms more: a computation that an
/// invalidate can overtake.
async fn slow_read(db: &Db) -> u32 {
    let price = db.read();
    tokio::time::sleep(Duration::from_millis(300)).await;
    price
}

#[cached(ttl = 600, prefix = "slow_price", skip(db), cache = cache)]
async fn slow_price(cache: &Cache, db: &Db, id: u64) -> u32 {
    // `id` only selects the entry.
    let _ = id;
    slow_read(db).await
}

fn a_value_read_before_an_invalidate_is_never_served_after_it(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(10);
        let (stale, ()) = tokio::join!(slow_price(&cache, &db, 1), async {
            // The computation has read 10 and is still running.
            tokio::time::sleep(Duration::from_millis(100)).await;
            db.price.store(20, SeqCst);
            cache.invalidate("slow_price").await.unwrap();
        });
        assert_eq!(stale, 10, "the running call returns what it computed");
        // But not under the new version: the script refuses it (a skipped
        // write); a fill nobody waited for lands bound to the old version
        // (a write), which no reader takes.
        let total = cache.stats().total;
        assert_eq!(total.writes_skipped + total.writes, 1, "{total:?}");
        assert_eq!(slow_price(&cache, &db, 1).await, 20);
        assert_eq!(slow_price(&cache, &db, 1).await, 20);
        assert_eq!(db.reads.load(SeqCst), 2);
    });
}

#[cached(ttl = 600, prefix = "slow_tagged", tags("prices"), skip(db), cache = cache)]
async fn slow_tagged(cache: &Cache, db: &Db, id: u64) -> u32 {
    let _ = id;
    slow_read(db).await
}

/// On a cluster the tag's version lives in another slot than the entry, so
/// no script can check it when storing: this is what the check after the
/// store is for.
fn a_tag_invalidated_while_computing_reaches_no_later_caller(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(10);
        let (old, (), late) = tokio::join!(
            slow_tagged(&cache, &db, 1),
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                db.price.store(20, SeqCst);
                cache.invalidate("prices").await.unwrap();
            },
            async {
                // Starts after the invalidate, while the first call computes:
                // it waits for that computation, but must not take its value.
                tokio::time::sleep(Duration::from_millis(200)).await;
                slow_tagged(&cache, &db, 1).await
            }
        );
        assert_eq!(old, 10, "the running call returns what it computed");
        assert_eq!(late, 20, "a call that started after the invalidate never gets the older value");
        let reads = db.reads();
        assert_eq!(slow_tagged(&cache, &db, 1).await, 20);
        assert_eq!(db.reads(), reads, "the newer value is cached");
    });
}

#[test]
fn invalidate_reports_when_redis_is_down() {
    run(DEADLINE, async {
        let cache = Cache::builder()
            .url(RedisServer::dead_url())
            .connect_timeout(Duration::from_millis(200))
            .command_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        for _ in 0..10 {
            let err = cache.invalidate("products").await.unwrap_err();
            assert!(matches!(err, Error::Connection(_) | Error::Timeout), "{err:?}");
        }
        // The breaker opened for cached calls, but write paths still try
        // (and still learn the truth).
        assert!(matches!(cache.invalidate("products").await, Err(Error::Connection(_))));
        assert!(matches!(cache.invalidate("bad name").await, Err(Error::InvalidConfig(_))));
    });
}

// --- cost --------------------------------------------------------------------

fn command_calls(conn: &mut redis::Connection) -> Vec<(String, u64)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Commands the clients sent, without those scripts ran inside Redis
/// (Redis 7.0 counts them too) and without our own INFO/CONFIG.
fn client_commands(conn: &mut redis::Connection, script_inner: &[&str]) -> Vec<(String, u64)> {
    command_calls(conn)
        .into_iter()
        .filter(|(name, _)| !["info", "config|resetstat"].contains(&name.as_str()))
        .filter(|(name, _)| !script_inner.contains(&name.as_str()))
        .collect()
}

#[cached(ttl = 600, prefix = "unlocked", tags("products"), lock = false, skip(db), cache = cache)]
async fn unlocked_page(cache: &Cache, db: &Db, id: u64) -> String {
    format!("product {id} costs {}", db.read())
}

/// The commands clients sent since the last reset, sorted. Redis 7.0 also
/// counts what scripts run inside it (GET, SET, DEL here); after warm-up
/// no script runs MGET, so every MGET counted was sent by a client.
fn commands_since_reset(admin: &mut redis::Connection) -> Vec<(String, u64)> {
    let mut sent = client_commands(admin, &["get", "set", "del"]);
    sent.sort();
    sent
}

fn reset_stats(admin: &mut redis::Connection) {
    redis::cmd("CONFIG").arg("RESETSTAT").query::<()>(admin).unwrap();
}

#[test]
fn a_hit_is_one_command_and_a_miss_adds_one_write() {
    let server = RedisServer::start();
    let mut admin = server.conn();
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(5);
        // Warm the connection, seed the namespaces, load the scripts.
        product_page(&cache, &db, 0).await;
        unlocked_page(&cache, &db, 0).await;

        reset_stats(&mut admin);
        unlocked_page(&cache, &db, 1).await;
        // No script runs: every command counted was sent.
        let mut sent = client_commands(&mut admin, &[]);
        sent.sort();
        assert_eq!(
            sent,
            [("mget".to_owned(), 1), ("set".to_owned(), 1)],
            "a miss without a stampede lock, of an empty key, nobody waiting and no local tier: MGET, then SET NX"
        );

        reset_stats(&mut admin);
        product_page(&cache, &db, 1).await;
        assert_eq!(
            commands_since_reset(&mut admin),
            [("eval".to_owned(), 1), ("evalsha".to_owned(), 1), ("mget".to_owned(), 1)],
            "a miss with the stampede lock (the default), nobody waiting: MGET, the lock, then SET NX and the release"
        );

        reset_stats(&mut admin);
        for _ in 0..50 {
            product_page(&cache, &db, 1).await;
            unlocked_page(&cache, &db, 1).await;
        }
        assert_eq!(
            commands_since_reset(&mut admin),
            [("mget".to_owned(), 100)],
            "100 hits: exactly 100 commands, tags included"
        );
    });
}

// --- per-entry ---------------------------------------------------------------

fn forget_and_refresh_name_the_entry_by_the_call(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(7);
        product_page(&cache, &db, 1).await;
        product_page(&cache, &db, 2).await;
        assert_eq!(db.reads.load(SeqCst), 2);

        assert_eq!(cache_runtime::forget(product_page(&cache, &db, 1)).await, Ok(true));
        assert_eq!(db.reads.load(SeqCst), 2, "forget never runs the body");
        assert_eq!(cache_runtime::forget(product_page(&cache, &db, 1)).await, Ok(false), "already gone");
        product_page(&cache, &db, 2).await;
        assert_eq!(db.reads.load(SeqCst), 2, "other entries stay");
        product_page(&cache, &db, 1).await;
        assert_eq!(db.reads.load(SeqCst), 3, "the forgotten entry is computed again");

        db.price.store(8, SeqCst);
        assert_eq!(cache_runtime::refresh(product_page(&cache, &db, 2)).await, "product 2 costs 8");
        assert_eq!(db.reads.load(SeqCst), 4, "refresh runs the body even though an entry existed");
        assert_eq!(product_page(&cache, &db, 2).await, "product 2 costs 8");
        assert_eq!(db.reads.load(SeqCst), 4, "and stores the fresh value");

        assert_eq!(cache_runtime::forget(async { 1 }).await, Err(Error::NotCached));
    });
}

#[cached(ttl = 600, prefix = "priced", skip(db, delay), cache = cache)]
async fn priced(cache: &Cache, db: &Db, delay: Duration, id: u64) -> u32 {
    let price = db.read();
    tokio::time::sleep(delay).await;
    // `id` only selects the entry.
    let _ = id;
    price
}

fn an_older_computation_never_overwrites_a_refresh(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(10);
        let slow = Duration::from_millis(300);

        // The old computation finishes first, the refresh after it.
        let (old, fresh) = tokio::join!(priced(&cache, &db, slow, 1), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            db.price.store(11, SeqCst);
            cache_runtime::refresh(priced(&cache, &db, slow, 1)).await
        });
        assert_eq!((old, fresh), (10, 11));
        assert_eq!(priced(&cache, &db, slow, 1).await, 11, "the refresh overwrote the older value");

        // The refresh finishes first, the old computation after it.
        let (old, fresh) = tokio::join!(priced(&cache, &db, slow, 2), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            db.price.store(12, SeqCst);
            cache_runtime::refresh(priced(&cache, &db, Duration::ZERO, 2)).await
        });
        assert_eq!((old, fresh), (11, 12));
        assert_eq!(priced(&cache, &db, slow, 2).await, 12, "the older value did not overwrite the refresh");
        assert_eq!(cache.stats().total.refreshes, 2);
        // Once the refresh found the older value stored after it read the
        // entry (it forgot the entry: which read newer data is unknown), once
        // the older computation found the refresh.
        assert_eq!(cache.stats().total.writes_skipped, 2);
    });
}

// --- programmatic ------------------------------------------------------------

fn get_or_compute_has_the_attribute_guarantees(server: &Topology) {
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let policy = Policy::new("reports").ttl(Duration::from_secs(60)).jitter(0.1).tags(["orders"]);
        let runs = AtomicUsize::new(0);
        let report = |region: &'static str, fail: bool| {
            runs.fetch_add(1, SeqCst);
            async move { if fail { Err(format!("{region}: db down")) } else { Ok(vec![region.len() as u64, 2026]) } }
        };

        let failed = cache.get_or_compute(&policy, &("emea", 2026), report("emea", true)).await;
        assert_eq!(failed, Err("emea: db down".to_owned()));
        let first = cache.get_or_compute(&policy, &("emea", 2026), report("emea", false)).await;
        assert_eq!(first, Ok(vec![4, 2026]));
        let runs_so_far = runs.load(SeqCst);
        let second: Result<Vec<u64>, String> =
            cache.get_or_compute(&policy, &("emea", 2026), async { Err("not called".to_owned()) }).await;
        assert_eq!(second, Ok(vec![4, 2026]), "a hit never awaits the computation");
        assert_eq!(runs.load(SeqCst), runs_so_far);

        cache.invalidate("orders").await.unwrap();
        let after: Result<Vec<u64>, String> =
            cache.get_or_compute(&policy, &("emea", 2026), async { Ok(vec![9]) }).await;
        assert_eq!(after, Ok(vec![9]), "tags invalidate programmatic entries too");

        assert_eq!(cache.forget::<_, Vec<u64>>(&policy, &("emea", 2026)).await, Ok(true));
        assert_eq!(cache.forget::<_, Vec<u64>>(&policy, &("emea", 2026)).await, Ok(false));
        let stats = cache.stats().total;
        assert_eq!((stats.hits, stats.writes), (1, 2));
    });
    let keys = entry_keys(&mut server.conn(), "shop:reports:*");
    assert!(keys.is_empty(), "{keys:?}");
}

fn a_lost_version_key_never_revives_old_entries(server: &Topology) {
    let mut admin = server.conn();
    run(DEADLINE, async {
        let cache = cache_for(&server.url());
        let db = Db::new(1);
        product_page(&cache, &db, 1).await;
        // Simulate eviction or a careless FLUSH of the version keys only.
        redis::cmd("DEL")
            .arg(&[
                "shop:products:{products}#v",
                "shop:categories:{categories}#v",
                "shop:product_page:{product_page}#v",
            ])
            .query::<()>(&mut admin)
            .unwrap();
        // The next invalidate starts from a fresh random version, not 1.
        let version = cache.invalidate("products").await.unwrap();
        assert!(version > 1 << 32, "{version}");
        product_page(&cache, &db, 1).await;
        assert_eq!(db.reads.load(SeqCst), 2, "the entry bound to the lost version is stale");
        product_page(&cache, &db, 1).await;
        assert_eq!(db.reads.load(SeqCst), 2);
    });
}

on_every_topology!(
    an_invalidate_in_another_process_is_seen_at_once,
    any_tag_invalidates_and_unrelated_namespaces_do_not,
    a_value_read_before_an_invalidate_is_never_served_after_it,
    forget_and_refresh_name_the_entry_by_the_call,
    an_older_computation_never_overwrites_a_refresh,
    get_or_compute_has_the_attribute_guarantees,
    a_lost_version_key_never_revives_old_entries,
    a_tag_invalidated_while_computing_reaches_no_later_caller,
);
