//! Redis Cluster specifics (feature `cluster`): a slot holding cached
//! entries moves to another node while callers keep calling. The core
//! behaviour suites (`cached`, `namespaces`, `stampede`, `tiers`) also run
//! on a cluster, through `on_every_topology!`.

#![cfg(feature = "cluster")]

mod support;

use cache_runtime::{Cache, cached};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use support::{RedisCluster, run};

const DEADLINE: Duration = Duration::from_secs(60);
const PRODUCTS: u64 = 300;

#[cached(ttl = 600, prefix = "products", tags("stock"), skip(computations), cache = cache)]
async fn product(cache: &Cache, computations: &AtomicUsize, id: u64) -> Result<String, String> {
    computations.fetch_add(1, SeqCst);
    Ok(format!("product {id}"))
}

fn node_id(conn: &mut redis::Connection) -> String {
    redis::cmd("CLUSTER").arg("MYID").query(conn).expect("CLUSTER MYID")
}

/// Moves `slot` from `source` to `target` the way `redis-cli --cluster
/// reshard` does, a few keys at a time with pauses, so that callers meet
/// the slot in every state: migrating (ASK), split (TRYAGAIN), moved.
fn migrate_slot(cluster: &RedisCluster, slot: u16, source: &support::RedisServer, target: &support::RedisServer) {
    let (mut from, mut to) = (source.conn(), target.conn());
    let (source_id, target_id) = (node_id(&mut from), node_id(&mut to));
    let _: () =
        redis::cmd("CLUSTER").arg(&["SETSLOT", &slot.to_string(), "IMPORTING", &source_id]).query(&mut to).unwrap();
    let _: () =
        redis::cmd("CLUSTER").arg(&["SETSLOT", &slot.to_string(), "MIGRATING", &target_id]).query(&mut from).unwrap();
    loop {
        let keys: Vec<String> =
            redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(10).query(&mut from).expect("GETKEYSINSLOT");
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg(&["127.0.0.1", &target.port().to_string(), "", "0", "5000", "KEYS"])
            .arg(&keys)
            .query(&mut from)
            .expect("MIGRATE");
        std::thread::sleep(Duration::from_millis(15));
    }
    for node in cluster.nodes() {
        let _: () = redis::cmd("CLUSTER")
            .arg(&["SETSLOT", &slot.to_string(), "NODE", &target_id])
            .query(&mut node.conn())
            .expect("SETSLOT NODE");
    }
}

#[test]
fn a_slot_moved_under_load_costs_callers_nothing() {
    let cluster = RedisCluster::start(3);
    let url = cluster.urls().join(",");
    let cache = support::patient_cache(&url, "shop").build().expect("valid cache settings");
    let computations = Arc::new(AtomicUsize::new(0));
    run(DEADLINE, async {
        for id in 0..PRODUCTS {
            product(&cache, &computations, id).await.unwrap();
        }
    });
    assert_eq!(computations.load(SeqCst), PRODUCTS as usize);
    let mut probe = cluster.conn();
    let entry = support::entry_keys(&mut probe, "shop:products:*").pop().expect("entries were stored");
    let (source, slot) = cluster.owner_of(&entry);
    let target = cluster.nodes().iter().find(|node| node.port() != source.port()).expect("another node");
    assert!(
        redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot).query::<u64>(&mut source.conn()).unwrap() > PRODUCTS,
        "the namespace's entries and its version share the slot"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let callers: Vec<_> = (0..8)
        .map(|task| {
            let (cache, computations, stop, calls) = (cache.clone(), computations.clone(), stop.clone(), calls.clone());
            runtime.spawn(async move {
                let mut id = task;
                while !stop.load(SeqCst) {
                    id = (id + 7) % PRODUCTS;
                    let answer = product(&cache, &computations, id).await;
                    assert_eq!(answer, Ok(format!("product {id}")), "a caller got a wrong answer or an error");
                    calls.fetch_add(1, SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    // Cold keys of the same namespace, from a cache of its own (its own
    // counts): misses in the moving slot, whose scripts may be refused.
    let cold_cache = support::patient_cache(&url, "shop").build().expect("valid cache settings");
    let cold_caller = {
        let (cache, stop) = (cold_cache.clone(), stop.clone());
        runtime.spawn(async move {
            let computations = AtomicUsize::new(0);
            let mut id = 1_000_000;
            while !stop.load(SeqCst) {
                id += 1;
                let answer = product(&cache, &computations, id).await;
                assert_eq!(answer, Ok(format!("product {id}")), "a cold caller got a wrong answer or an error");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = (calls.load(SeqCst), cache.stats().total);
    let started = Instant::now();
    migrate_slot(&cluster, slot, source, target);
    let migration = started.elapsed();
    let during = (calls.load(SeqCst), cache.stats().total);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, SeqCst);
    runtime.block_on(async {
        for caller in callers {
            caller.await.expect("no caller panicked");
        }
        cold_caller.await.expect("the cold caller did not panic");
    });
    let after = cache.stats().total;
    let cold = cold_cache.stats().total;
    println!(
        "cold keys meanwhile: {} misses, {} stored, {} computed without the cache, {} Redis errors",
        cold.misses,
        cold.writes,
        cold.bypassed,
        cold.errors()
    );
    println!(
        "moved slot {slot} ({} keys) in {migration:?} while {} calls ran: {} hits, {} misses, {} answered without the \
         cache, {} Redis errors ({} timeouts, {} connection, {} server); then {} calls, {} hits",
        PRODUCTS + 1,
        during.0 - before.0,
        during.1.hits - before.1.hits,
        during.1.misses - before.1.misses,
        during.1.bypassed - before.1.bypassed,
        during.1.errors() - before.1.errors(),
        during.1.timeouts - before.1.timeouts,
        during.1.connection_errors - before.1.connection_errors,
        during.1.server_errors - before.1.server_errors,
        calls.load(SeqCst) - during.0,
        after.hits - during.1.hits,
    );

    assert_eq!(cluster.owner_of(&entry).0.port(), target.port(), "the slot moved");
    assert!(during.0 - before.0 > 50, "callers kept calling during the move");
    // Multi-key reads of the half-moved slot are refused (TRYAGAIN, or a
    // redirection redis-rs does not follow for MGET); read key by key
    // instead, every call still hit.
    assert_eq!(during.1.errors(), before.1.errors(), "no Redis errors during the move");
    let fell_through = |counts: &cache_runtime::Counts| counts.misses + counts.bypassed;
    assert_eq!(fell_through(&during.1), fell_through(&before.1), "every call during the move hit");
    assert!(after.hits - during.1.hits > 100, "entries are served from their new node: {after:?}");
    assert_eq!(fell_through(&after), fell_through(&during.1), "after the move, every call hits");
    assert_eq!(after.errors(), during.1.errors(), "no Redis errors once the slot has moved");
}

/// The version keys of a tagged entry live in other slots than the entry,
/// on other nodes here: what `namespaces`' cluster runs exercise.
#[test]
fn a_tagged_entry_spans_nodes() {
    let cluster = RedisCluster::start(3);
    let owners: std::collections::BTreeSet<u16> = ["shop:products:{products}#v", "shop:stock:{stock}#v"]
        .iter()
        .map(|key| cluster.owner_of(key).0.port())
        .collect();
    assert_eq!(owners.len(), 2, "the prefix's and the tag's versions are on different nodes");
    let cache = support::patient_cache(&cluster.urls().join(","), "shop").build().unwrap();
    let computations = AtomicUsize::new(0);
    run(DEADLINE, async {
        assert_eq!(product(&cache, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(product(&cache, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(computations.load(SeqCst), 1);
        cache.invalidate("stock").await.expect("invalidate a tag on another node");
        assert_eq!(product(&cache, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(computations.load(SeqCst), 2, "the tag's invalidation reached the entry");
        assert_eq!(cache.stats().total.errors(), 0);
    });
}

/// `rediss://` nodes that also speak TLS among themselves: trusted through
/// a private CA, refused without it.
#[cfg(feature = "tls")]
#[test]
fn a_tls_cluster_with_a_private_ca() {
    let certs = support::Certificates::generate("cluster");
    let cluster = support::TlsRedisCluster::start(&certs, 3);
    let builder = || {
        Cache::builder()
            .cluster(cluster.urls())
            .key_prefix("shop")
            .connect_timeout(Duration::from_secs(2))
            .command_timeout(Duration::from_secs(2))
    };
    let trusted = builder().tls_root_certificate(certs.read("ca.crt")).build().expect("valid TLS settings");
    let untrusted = builder().build().expect("valid settings");
    let computations = AtomicUsize::new(0);
    run(DEADLINE, async {
        for _ in 0..3 {
            assert_eq!(product(&trusted, &computations, 1).await, Ok("product 1".to_owned()));
        }
        assert_eq!(computations.load(SeqCst), 1, "cached over TLS");
        trusted.invalidate("stock").await.expect("invalidate over TLS");
        assert_eq!(product(&trusted, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(computations.load(SeqCst), 2);
        assert_eq!(trusted.stats().total.errors(), 0);

        assert_eq!(product(&untrusted, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(computations.load(SeqCst), 3, "without the CA the certificate is refused: computed");
        assert!(untrusted.invalidate("stock").await.is_err());
    });
}

/// `examples/cluster.rs`, run as a user would, against a private cluster.
#[test]
fn the_cluster_example_runs_as_documented() {
    let cluster = RedisCluster::start(3);
    let example = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.join("examples").join("cluster")))
        .expect("the examples directory");
    let output = std::process::Command::new(&example)
        .env("REDIS_CLUSTER_NODES", cluster.urls().join(","))
        .output()
        .unwrap_or_else(|e| panic!("run {} (cargo test builds examples first): {e}", example.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    assert!(
        stdout.contains("queries run: 2   hits: 2   misses: 2   Redis errors: 0"),
        "one miss, one hit, a tag invalidated on another node, one miss, one hit: {stdout}"
    );
}
