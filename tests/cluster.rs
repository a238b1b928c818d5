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

/// A cache on `cluster` with `PRODUCTS` entries stored, and the key of one.
fn warm_cache(cluster: &RedisCluster) -> (Cache, Arc<AtomicUsize>, String) {
    let cache = support::patient_cache(&cluster.urls().join(","), "shop").build().expect("valid cache settings");
    let computations = Arc::new(AtomicUsize::new(0));
    run(DEADLINE, async {
        for id in 0..PRODUCTS {
            product(&cache, &computations, id).await.unwrap();
        }
    });
    assert_eq!(computations.load(SeqCst), PRODUCTS as usize);
    let entry = support::entry_keys(&mut cluster.conn(), "shop:products:*").pop().expect("entries were stored");
    (cache, computations, entry)
}

/// Callers of warm keys on a runtime of their own, each checking every
/// answer, until `finish`.
struct Load {
    runtime: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    callers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(cache: &Cache, computations: &Arc<AtomicUsize>, tasks: u64) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (stop, calls) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let callers = (0..tasks)
            .map(|task| {
                let (cache, computations) = (cache.clone(), computations.clone());
                let (stop, calls) = (stop.clone(), calls.clone());
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
        Self { runtime, stop, calls, callers }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    /// Stops the callers; panics if one of them got a wrong answer.
    fn finish(self) -> usize {
        self.stop.store(true, SeqCst);
        let Self { runtime, calls, callers, .. } = self;
        runtime.block_on(async {
            for caller in callers {
                caller.await.expect("no caller panicked");
            }
        });
        calls.load(SeqCst)
    }
}

fn fell_through(counts: &cache_runtime::Counts) -> u64 {
    counts.misses + counts.bypassed
}

#[test]
fn a_slot_moved_under_load_costs_callers_nothing() {
    let cluster = RedisCluster::start(3);
    let (cache, computations, entry) = warm_cache(&cluster);
    let (source, slot) = cluster.owner_of(&entry);
    let target = cluster.nodes().iter().find(|node| node.port() != source.port()).expect("another node");
    assert!(
        redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot).query::<u64>(&mut source.conn()).unwrap() > PRODUCTS,
        "the namespace's entries and its version share the slot"
    );

    let load = Load::start(&cache, &computations, 8);
    // Cold keys of the same namespace, from a cache of its own (its own
    // counts): misses in the moving slot, whose scripts may be refused.
    let cold_cache = support::patient_cache(&cluster.urls().join(","), "shop").build().expect("valid settings");
    let mut load = load;
    let cold_caller = {
        let (cache, stop) = (cold_cache.clone(), load.stop.clone());
        load.runtime.spawn(async move {
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
    load.callers.push(cold_caller);
    std::thread::sleep(Duration::from_millis(300));
    let before = (load.calls(), cache.stats().total);
    let started = Instant::now();
    migrate_slot(&cluster, slot, source, target);
    let migration = started.elapsed();
    let during = (load.calls(), cache.stats().total);
    std::thread::sleep(Duration::from_millis(500));
    let calls = load.finish();
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
        calls - during.0,
        after.hits - during.1.hits,
    );

    assert_eq!(cluster.owner_of(&entry).0.port(), target.port(), "the slot moved");
    assert!(during.0 - before.0 > 50, "callers kept calling during the move");
    // Multi-key reads of the half-moved slot are refused (TRYAGAIN, or a
    // redirection redis-rs does not follow for MGET); read key by key
    // instead, every call still hit.
    assert_eq!(during.1.errors(), before.1.errors(), "no Redis errors during the move");
    assert_eq!(fell_through(&during.1), fell_through(&before.1), "every call during the move hit");
    assert!(after.hits - during.1.hits > 100, "entries are served from their new node: {after:?}");
    assert_eq!(fell_through(&after), fell_through(&during.1), "after the move, every call hits");
    assert_eq!(after.errors(), during.1.errors(), "no Redis errors once the slot has moved");
}

/// `CLUSTER FAILOVER` on the replica of the master serving the namespace,
/// under load: the cache follows the new master by itself.
#[test]
fn a_failover_under_load_costs_callers_nothing() {
    let cluster = RedisCluster::start_with_replicas(3, 1);
    let (cache, computations, entry) = warm_cache(&cluster);
    let (master, _) = cluster.owner_of(&entry);
    let replica = cluster.replica_of(master.port());
    let load = Load::start(&cache, &computations, 8);
    std::thread::sleep(Duration::from_millis(300));
    let before = (load.calls(), cache.stats().total);
    let started = Instant::now();
    let _: () = redis::cmd("CLUSTER").arg("FAILOVER").query(&mut replica.conn()).expect("CLUSTER FAILOVER");
    while cluster.owner_of(&entry).0.port() != replica.port() {
        assert!(started.elapsed() < Duration::from_secs(20), "the replica never took over");
        std::thread::sleep(Duration::from_millis(10));
    }
    let switch = started.elapsed();
    // Let every caller meet the new topology before counting again.
    std::thread::sleep(Duration::from_millis(300));
    let during = (load.calls(), cache.stats().total);
    std::thread::sleep(Duration::from_millis(500));
    let calls = load.finish();
    let after = cache.stats().total;
    println!(
        "failover took {switch:?}; {} calls meanwhile: {} hits, {} answered without the cache, {} Redis errors; \
         then {} calls, {} hits",
        during.0 - before.0,
        during.1.hits - before.1.hits,
        fell_through(&during.1) - fell_through(&before.1),
        during.1.errors() - before.1.errors(),
        calls - during.0,
        after.hits - during.1.hits,
    );
    assert!(after.hits - during.1.hits > 100, "entries are served by the new master: {after:?}");
    assert_eq!(fell_through(&after), fell_through(&during.1), "after the failover, every call hits");
    assert_eq!(after.errors(), during.1.errors(), "no Redis errors once the replica took over");
    // A manual failover is graceful (the master holds its clients until the
    // replica has everything), so not one call recomputed.
    assert_eq!(computations.load(SeqCst), PRODUCTS as usize, "only the warm-up computed");
}

/// The master serving the namespace is killed under load: calls compute
/// without the cache until the cluster promotes its replica, then the cache
/// follows the new master by itself.
#[test]
fn a_killed_master_is_replaced_and_callers_never_fail() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let (cache, computations, entry) = warm_cache(&cluster);
    let master = cluster.owner_of(&entry).0.port();
    let replica = cluster.replica_of(master).port();
    let load = Load::start(&cache, &computations, 8);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    cluster.kill_node(master);
    while cluster.try_owner_of(&entry).map(|node| node.port()) != Some(replica) {
        assert!(started.elapsed() < Duration::from_secs(30), "the replica never took over");
        std::thread::sleep(Duration::from_millis(20));
    }
    let promoted = started.elapsed();
    let at_promotion = cache.stats().total;
    // Give every connection time to learn the new slot map.
    std::thread::sleep(Duration::from_secs(2));
    let settled = (load.calls(), cache.stats().total);
    std::thread::sleep(Duration::from_millis(500));
    let calls = load.finish();
    let after = cache.stats().total;
    println!(
        "replica promoted {promoted:?} after the kill; {} calls until then and 2 s more, every answer right \
         ({} computed without the cache; {} hits in the 2 s after the promotion); then {} calls: {} hits, {} Redis \
         errors",
        settled.0,
        fell_through(&settled.1) - PRODUCTS,
        settled.1.hits - at_promotion.hits,
        calls - settled.0,
        after.hits - settled.1.hits,
        after.errors() - settled.1.errors(),
    );
    assert!(after.hits - settled.1.hits > 100, "entries are served by the promoted replica: {after:?}");
    assert_eq!(fell_through(&after), fell_through(&settled.1), "once settled, every call hits");
    assert_eq!(after.errors(), settled.1.errors(), "no Redis errors once settled");
}

/// An ACL user limited to the application's keys and channels, named in
/// the node URLs: the cluster connection authenticates to every node it
/// reaches, and every key the cache touches is inside `~shop:*`.
#[test]
fn an_acl_user_limited_to_the_applications_keys_is_enough() {
    let cluster = RedisCluster::start(3);
    for node in cluster.nodes() {
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "shop-app", "on", ">s3cret", "resetkeys", "~shop:*", "resetchannels", "&shop:*", "+@all"])
            .query(&mut node.conn())
            .expect("create the ACL user");
    }
    let urls: Vec<String> =
        cluster.nodes().iter().map(|node| format!("redis://shop-app:s3cret@127.0.0.1:{}", node.port())).collect();
    let cache = support::patient_cache(&urls.join(","), "shop").build().expect("valid settings");
    let wrong = support::patient_cache(&urls.join(",").replace("s3cret", "hunter2"), "shop").build().unwrap();
    let computations = AtomicUsize::new(0);
    run(DEADLINE, async {
        for _ in 0..3 {
            assert_eq!(product(&cache, &computations, 1).await, Ok("product 1".to_owned()));
        }
        cache.invalidate("stock").await.expect("invalidate as the ACL user");
        assert_eq!(product(&cache, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(computations.load(SeqCst), 2, "cached, then invalidated through the tag");
        assert_eq!(cache.stats().total.errors(), 0, "{:?}", cache.stats().total);

        assert_eq!(product(&wrong, &computations, 1).await, Ok("product 1".to_owned()));
        assert_eq!(computations.load(SeqCst), 3, "a wrong password: computed, uncached");
        let err = wrong.invalidate("stock").await.unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "the password never shows: {err}");
        assert!(err.contains("Redis refused the credentials"), "{err}");
    });
}

static CATALOG_PRICE: AtomicUsize = AtomicUsize::new(1);

#[cached(ttl = 600, prefix = "catalog", local = true, cache = cache)]
async fn catalog_page(cache: &Cache, id: u64) -> String {
    format!("item {id} costs {}", CATALOG_PRICE.load(SeqCst))
}

/// Calls until one is answered by the local tier, which it is only while
/// the invalidation channel is subscribed; returns how long that took.
async fn until_local_hit(cache: &Cache) -> Duration {
    let started = Instant::now();
    loop {
        let before = cache.stats().total.local_hits;
        catalog_page(cache, 1).await;
        if cache.stats().total.local_hits > before {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the local tier never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The local tier's channel subscribes on one node; when that node dies it
/// moves to the next, and invalidations reach the tier again.
#[test]
fn the_local_tier_outlives_the_node_its_channel_was_on() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let master = cluster.owner_of("shop:catalog:{catalog}#v").0.port();
    let replica = cluster.replica_of(master).port();
    // The replica first: the channel subscribes there, and killing it
    // leaves every slot served.
    let mut urls = vec![format!("redis://127.0.0.1:{replica}")];
    urls.extend(cluster.urls().into_iter().filter(|url| !url.ends_with(&format!(":{replica}"))));
    let tiered = support::patient_cache(&urls.join(","), "shop").local(100).build().expect("valid settings");
    let writer = support::patient_cache(&urls[1..].join(","), "shop").build().expect("valid settings");
    run(DEADLINE, async {
        until_local_hit(&tiered).await;
        cluster.kill_node(replica);
        let killed = Instant::now();
        // The subscription ends with the node: the tier stops answering...
        loop {
            let before = tiered.stats().total.local_hits;
            catalog_page(&tiered, 1).await;
            if tiered.stats().total.local_hits == before {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(5), "the tier kept answering without its channel");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ...until the channel is subscribed on another node.
        until_local_hit(&tiered).await;
        println!("local hits resumed {:?} after the channel's node was killed", killed.elapsed());

        CATALOG_PRICE.store(2, SeqCst);
        writer.invalidate("catalog").await.expect("invalidate");
        let started = Instant::now();
        while catalog_page(&tiered, 1).await != "item 1 costs 2" {
            assert!(started.elapsed() < Duration::from_secs(1), "the invalidation never reached the local tier");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!("an invalidation reached the local tier through another node in {:?}", started.elapsed());
    });
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
