//! Bulk calls (`#[cached(batch(ids))]`, `Cache::get_or_compute_many`)
//! against real Redis servers: one entry per item, keyed as a single call
//! of that item; only missing items reach the body, each once; absent
//! items are cached; errors are not; per-item forget and invalidate; and
//! one computation per item under a thousand concurrent callers.

mod support;

use cache_runtime::{Cache, Policy, cached, forget};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, entry_keys, run};

const DEADLINE: Duration = Duration::from_secs(60);

fn cache_for(server: &RedisServer, key_prefix: &str) -> Cache {
    support::patient_cache(&server.url(), key_prefix).build().expect("valid cache settings")
}

/// What the body was asked for, call by call.
#[derive(Default)]
struct Asked(Mutex<Vec<Vec<u64>>>);

impl Asked {
    fn record(&self, ids: &[u64]) {
        self.0.lock().unwrap().push(ids.to_vec());
    }
    fn take(&self) -> Vec<Vec<u64>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Odd ids do not exist.
#[cached(ttl = 60, prefix = "names", batch(ids), skip(asked), cache = cache)]
async fn names(cache: &Cache, asked: &Asked, region: &str, ids: Vec<u64>) -> HashMap<u64, String> {
    names_of(asked, region, ids)
}

/// A call site of its own for one test, with [`names`]' signature and
/// body: what a site remembers (whether its bulk reads miss, the items it
/// read lately) is the site's, which the tests that `cargo test` runs
/// beside it on other threads would move.
macro_rules! names_site {
    () => {
        #[cached(ttl = 60, prefix = "names", batch(ids), skip(asked), cache = cache)]
        async fn names(cache: &Cache, asked: &Asked, region: &str, ids: Vec<u64>) -> HashMap<u64, String> {
            names_of(asked, region, ids)
        }
    };
}

/// The body of [`names`]: records what it was asked for.
fn names_of(asked: &Asked, region: &str, ids: Vec<u64>) -> HashMap<u64, String> {
    asked.record(&ids);
    ids.into_iter().filter(|id| id % 2 == 0).map(|id| (id, format!("{region}-{id}"))).collect()
}

#[test]
fn only_missing_items_reach_the_body_each_once() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        let first = names(&cache, &asked, "eu", vec![2, 4, 6]).await;
        assert_eq!(first, HashMap::from([(2, "eu-2".into()), (4, "eu-4".into()), (6, "eu-6".into())]));
        let second = names(&cache, &asked, "eu", vec![6, 8, 4, 8, 10, 8]).await;
        assert_eq!(
            second,
            HashMap::from([(4, "eu-4".into()), (6, "eu-6".into()), (8, "eu-8".into()), (10, "eu-10".into())])
        );
        assert_eq!(asked.take(), vec![vec![2, 4, 6], vec![8, 10]], "only the missing ids, each once, in order");
        names(&cache, &asked, "us", vec![2]).await;
        assert_eq!(asked.take(), vec![vec![2]], "the other arguments are part of each item's key");
        let stats = cache.stats().total;
        assert_eq!((stats.hits, stats.misses, stats.writes), (2, 6, 6), "counted per item: {stats:?}");
    });
    assert_eq!(entry_keys(&mut server.conn(), "app:names:*").len(), 6, "one entry per item");
}

#[test]
fn absent_items_are_cached_unless_skipped() {
    #[cached(ttl = 60, prefix = "skipping", batch(ids), skip(asked), cache = cache, absent = "skip")]
    async fn skipping(cache: &Cache, asked: &Asked, ids: Vec<u64>) -> BTreeMap<u64, u64> {
        asked.record(&ids);
        ids.into_iter().filter(|id| id % 2 == 0).map(|id| (id, id * 10)).collect()
    }
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        assert_eq!(names(&cache, &asked, "eu", vec![1, 2, 3]).await.len(), 1);
        assert_eq!(names(&cache, &asked, "eu", vec![1, 2, 3]).await.len(), 1);
        assert_eq!(asked.take(), vec![vec![1, 2, 3]], "absent ids are cached as absent");

        assert_eq!(skipping(&cache, &asked, vec![1, 2, 3]).await, BTreeMap::from([(2, 20)]));
        assert_eq!(skipping(&cache, &asked, vec![1, 2, 3]).await, BTreeMap::from([(2, 20)]));
        assert_eq!(asked.take(), vec![vec![1, 2, 3], vec![1, 3]], "`absent = \"skip\"` asks again");
    });
}

#[cached(ttl = 60, prefix = "flaky", batch(ids), skip(asked, fail), cache = cache)]
async fn flaky(cache: &Cache, asked: &Asked, fail: bool, ids: &[u64]) -> Result<Vec<(u64, u64)>, String> {
    asked.record(ids);
    if fail {
        return Err("database down".into());
    }
    Ok(ids.iter().map(|&id| (id, id + 100)).collect())
}

#[test]
fn errors_are_returned_and_never_stored() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        assert_eq!(flaky(&cache, &asked, false, &[1]).await, Ok(vec![(1, 101)]));
        assert_eq!(flaky(&cache, &asked, true, &[1, 2, 3]).await, Err("database down".into()));
        assert_eq!(
            flaky(&cache, &asked, false, &[3, 1, 2]).await,
            Ok(vec![(3, 103), (1, 101), (2, 102)]),
            "a Vec keeps the caller's order"
        );
        assert_eq!(asked.take(), vec![vec![1], vec![2, 3], vec![3, 2]], "nothing of the Err was stored");
        assert_eq!(cache.stats().total.writes, 3);
    });
}

#[test]
fn redis_down_means_the_body_gets_every_item() {
    run(DEADLINE, async {
        let cache = support::patient_cache(&RedisServer::dead_url(), "app")
            .connect_timeout(Duration::from_millis(200))
            .build()
            .expect("valid cache settings");
        let asked = Asked::default();
        for _ in 0..2 {
            assert_eq!(names(&cache, &asked, "eu", vec![2, 3, 2]).await, HashMap::from([(2, "eu-2".into())]));
        }
        assert_eq!(asked.take(), vec![vec![2, 3], vec![2, 3]]);
        assert!(cache.stats().total.bypassed >= 4);
    });
}

#[test]
fn forget_and_invalidate_work_per_item() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![2, 4, 6]).await;
        // The generated forget: the call names the entry of each item given.
        assert_eq!(forget(names(&cache, &asked, "eu", vec![4])).await, Ok(true));
        names(&cache, &asked, "eu", vec![2, 4, 6]).await;
        assert_eq!(asked.take(), vec![vec![2, 4, 6], vec![4]], "only the forgotten item is computed again");
        cache.invalidate("names").await.expect("invalidate");
        names(&cache, &asked, "eu", vec![2, 4, 6]).await;
        assert_eq!(asked.take(), vec![vec![2, 4, 6]], "invalidating the prefix reaches every item");
    });
}

/// A page whose site hit last time reads first, then takes the missing
/// items' locks as a single call takes its lock with its read: `SET NX PX`
/// each and one `MGET` of their entries, in one pipeline, no script (one
/// `LOCK` script each before: 11 µs of Redis each, `SET` 1.5 µs).
#[test]
fn a_page_that_usually_hits_locks_its_misses_without_a_script() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![2, 4]).await;
        // All hits: the site no longer expects misses, and reads first.
        names(&cache, &asked, "eu", vec![2, 4]).await;
        let () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
        let got = names(&cache, &asked, "eu", vec![2, 4, 6, 7, 8]).await;
        assert_eq!(got.len(), 4, "{got:?}");
        let calls = server.command_calls();
        // The read; three locks and their re-read; three fills and one
        // release of the three locks.
        assert_eq!(calls.get("evalsha"), None, "{calls:?}");
        assert_eq!(
            (calls.get("mget"), calls.get("set"), calls.get("eval")),
            (Some(&2), Some(&6), Some(&1)),
            "{calls:?}"
        );
        assert_eq!(names(&cache, &asked, "eu", vec![2, 4, 6, 7, 8]).await, got);
        assert_eq!(asked.take(), vec![vec![2, 4], vec![6, 7, 8]], "every item stored, the absent one too");
        assert!(support::entry_keys(&mut server.conn(), "app:*#lock").is_empty(), "no lock left");
    });
}

/// Items whose keys were empty are filled with `SET NX` (their locks
/// released by `EVAL`), an item over a tombstone is stored by `STORE`, all
/// in one pipeline; every item reads back.
#[test]
fn empty_items_are_filled_without_the_script_in_the_stores_pipeline() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![2]).await;
        assert_eq!(forget(names(&cache, &asked, "eu", vec![6])).await, Ok(false), "a tombstone, nothing else");
        // An item over a tombstone is stored by `STORE`: loaded before the
        // count, which a first `NOSCRIPT` would change.
        assert_eq!(forget(names(&cache, &asked, "eu", vec![9])).await, Ok(false));
        names(&cache, &asked, "eu", vec![9]).await;
        let () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
        let got = names(&cache, &asked, "eu", vec![6, 7, 8, 10]).await;
        assert_eq!(got.len(), 3, "{got:?}");
        let calls = server.command_calls();
        // The read takes the locks of the four items the site never read
        // (`SET NX`, item 6 only forgotten); one `STORE` for the item over
        // its tombstone, and one release, of the three fills' locks, after
        // them.
        assert_eq!((calls.get("evalsha"), calls.get("eval")), (Some(&1), Some(&1)), "{calls:?}");
        let again = names(&cache, &asked, "eu", vec![6, 7, 8, 10]).await;
        assert_eq!(again, got);
        assert_eq!(asked.take(), vec![vec![2], vec![9], vec![6, 7, 8, 10]], "every item stored, the absent one too");
        assert_eq!(cache.stats().total.errors(), 0);
    });
}

/// A site that read most of a page lately takes, with its read, the locks
/// of only the items it never read, by `SET NX PX`: no script, where the
/// `CLAIM` script judged every entry (its Lua cost Redis ten times an
/// `MGET` of them).
#[test]
fn a_page_of_regulars_locks_its_new_items_with_its_read_and_no_script() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        let regulars: Vec<u64> = (100..120).collect();
        // A site remembers from its second read on; the second misses
        // too, so the next read expects misses.
        names(&cache, &asked, "eu", regulars.clone()).await;
        names(&cache, &asked, "eu", regulars.iter().copied().chain([300]).collect()).await;
        let mut conn = server.conn();
        let () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut conn).expect("resetstat");
        let before = reads(&mut conn);
        let page: Vec<u64> = regulars.iter().copied().chain(200..205).collect();
        let got = names(&cache, &asked, "eu", page.clone()).await;
        // The second `INFO`'s own read counts too.
        let round_trips = reads(&mut conn) - before - 1;
        assert_eq!(got, names_of(&Asked::default(), "eu", page), "{got:?}");
        let calls = server.command_calls();
        // Five locks and one `MGET`; five fills and one release.
        assert_eq!(calls.get("evalsha"), None, "{calls:?}");
        assert_eq!(
            (calls.get("mget"), calls.get("set"), calls.get("eval")),
            (Some(&1), Some(&10), Some(&1)),
            "{calls:?}"
        );
        assert_eq!(round_trips, 2, "{calls:?}");
        assert_eq!(asked.take(), vec![regulars, vec![300], (200..205).collect()]);
        assert!(locks_held(&server).is_empty());
    });
}

/// Items another process filled are current, but this site never read
/// them: its guess locks them all for nothing. It then reads with the
/// `CLAIM` script, which judges each entry, for a while.
#[test]
fn a_site_that_guessed_wrong_claims_with_the_script_for_a_while() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        // Another process: a cache of its own, whose calls of the site
        // remember nothing in it.
        let other = cache_for(&server, "app");
        let asked = Asked::default();
        // Two reads: a site remembers from its second on.
        names(&cache, &asked, "eu", vec![1]).await;
        names(&cache, &asked, "eu", vec![1, 3]).await;
        names(&other, &asked, "eu", (100..140).collect()).await;
        asked.take();
        let () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
        // Forty items it never read, one of them new: forty locks asked for,
        // thirty-nine for nothing, and released.
        let got = names(&cache, &asked, "eu", (100..141).collect()).await;
        assert_eq!(got.len(), 21, "the even ids");
        let calls = server.command_calls();
        assert_eq!((calls.get("evalsha"), calls.get("set")), (None, Some(&42)), "{calls:?}");
        // So the next pages, items of the other process's again, are
        // claimed by the script.
        names(&other, &asked, "eu", (200..240).collect()).await;
        let () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("resetstat");
        let got = names(&cache, &asked, "eu", (200..241).collect()).await;
        assert_eq!(got.len(), 21, "the even ids");
        let calls = server.command_calls();
        // The script, which locks only the new item, and its fill.
        assert_eq!((calls.get("evalsha"), calls.get("set")), (Some(&1), Some(&2)), "{calls:?}");
        assert_eq!(asked.take(), vec![vec![140], (200..240).collect(), vec![240]]);
        assert!(locks_held(&server).is_empty());
    });
}

#[test]
fn scripts_the_server_lost_are_loaded_again() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![2, 4]).await;
        let () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut server.conn()).expect("SCRIPT FLUSH");
        names(&cache, &asked, "eu", vec![2, 4, 6, 8]).await;
        names(&cache, &asked, "eu", vec![6, 8]).await;
        assert_eq!(asked.take(), vec![vec![2, 4], vec![6, 8]], "locked and stored after NOSCRIPT");
        assert_eq!(cache.stats().total.errors(), 0);
    });
}

#[test]
fn a_bad_entry_is_a_counted_miss() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![2]).await;
        let keys = entry_keys(&mut server.conn(), "app:names:*");
        assert_eq!(keys.len(), 1);
        let () = redis::cmd("SET").arg(&keys[0]).arg("not an entry").query(&mut server.conn()).expect("SET");
        assert_eq!(names(&cache, &asked, "eu", vec![2, 4]).await.len(), 2);
        assert_eq!(names(&cache, &asked, "eu", vec![2, 4]).await.len(), 2);
        assert_eq!(asked.take(), vec![vec![2], vec![2, 4]], "recomputed, then stored over");
        assert_eq!(cache.stats().total.decode_errors, 1);
    });
}

#[test]
fn large_items_are_stored_compressed_and_read_back() {
    #[cached(ttl = 60, prefix = "large", batch(ids), skip(asked), cache = cache)]
    async fn large(cache: &Cache, asked: &Asked, ids: Vec<u64>) -> HashMap<u64, String> {
        asked.record(&ids);
        ids.into_iter().map(|id| (id, format!("{id} ").repeat(1_000))).collect()
    }
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        let first = large(&cache, &asked, vec![1, 2]).await;
        assert_eq!(large(&cache, &asked, vec![2, 1]).await, first);
        assert_eq!(asked.take(), vec![vec![1, 2]]);
        assert_eq!(first[&2], "2 ".repeat(1_000));
    });
    let mut conn = server.conn();
    for key in entry_keys(&mut conn, "app:large:*") {
        let entry: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).expect("GET");
        assert!(entry.starts_with(b"RC2|bl|") && entry.len() < 1_000, "stored compressed: {} bytes", entry.len());
    }
}

#[test]
fn programmatic_items_are_the_single_entries() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let policy = Policy::new("users").ttl(Duration::from_secs(60));
        let asked = Asked::default();
        let load = |ids: Vec<u64>| {
            asked.record(&ids);
            async move { Ok::<_, String>(ids.into_iter().filter(|id| *id != 3).map(|id| (id, format!("user {id}")))) }
        };
        let users: HashMap<u64, String> = cache.get_or_compute_many(&policy, [1, 2, 3, 2], load).await.unwrap();
        assert_eq!(users.len(), 2);
        // Each item's entry is exactly `get_or_compute`'s for an `Option`.
        let single = async |id: u64| {
            let fresh = async move { Ok::<Option<String>, String>(Some(format!("fresh {id}"))) };
            cache.get_or_compute(&policy, &id, fresh).await
        };
        assert_eq!(single(2).await, Ok(Some("user 2".to_owned())));
        assert_eq!(single(3).await, Ok(None), "the absent item is cached as `None`");
        cache.forget::<_, Option<String>>(&policy, &1u64).await.unwrap();
        let users: Vec<(u64, String)> = cache.get_or_compute_many(&policy, [3, 1], load).await.unwrap();
        assert_eq!(users, vec![(1, "user 1".to_owned())]);
        assert_eq!(asked.take(), vec![vec![1, 2, 3], vec![1]]);
    });
}

#[test]
fn a_thousand_overlapping_callers_compute_each_id_once() {
    #[cached(ttl = 60, prefix = "crowd", batch(ids), skip(runs), cache = cache)]
    async fn crowd(cache: &Cache, runs: &[AtomicUsize], ids: Vec<u64>) -> HashMap<u64, u64> {
        for &id in &ids {
            runs[id as usize].fetch_add(1, SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ids.into_iter().map(|id| (id, id * 2)).collect()
    }
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let runs: &'static [AtomicUsize] = Box::leak((0..300).map(|_| AtomicUsize::new(0)).collect());
        let mut asked = std::collections::BTreeSet::new();
        let tasks: Vec<_> = (0..1000u64)
            .map(|caller| {
                let cache = cache.clone();
                // Overlapping windows of 20 ids, in shuffled order.
                let start = (caller * 3) % 280;
                let mut ids: Vec<u64> = (start..start + 20).collect();
                asked.extend(ids.iter().copied());
                ids.rotate_left((caller % 20) as usize);
                tokio::spawn(async move {
                    let found = crowd(&cache, runs, ids.clone()).await;
                    assert!(ids.iter().all(|id| found.get(id) == Some(&(id * 2))), "caller {caller}");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a caller panicked");
        }
        let computed: Vec<usize> = runs.iter().map(|r| r.load(SeqCst)).collect();
        assert!(computed.iter().all(|&n| n <= 1), "an id was computed twice: {computed:?}");
        assert_eq!(computed.iter().sum::<usize>(), asked.len(), "every id asked for was computed");
    });
}

/// The truth behind the cache in the randomized test: each item's
/// generation, which writes move forward before they forget or invalidate.
struct Truth {
    generations: Mutex<Vec<u64>>,
    /// The generation of each item that a completed forget or invalidate
    /// guarantees: no read that starts later may answer older.
    floor: Mutex<Vec<u64>>,
    /// Writes of each item under way (locked after `generations`).
    writing: Mutex<Vec<u32>>,
    /// Each completed computation: item, generation, the call's number, and
    /// whether no write of the item began since the call did, nor was under
    /// way (otherwise the cache may rightly refuse to store what was read,
    /// as bound to versions older than the data, and compute it again).
    computed: Mutex<Vec<(u64, u64, u64, bool)>>,
    /// The calls dropped mid-flight: each may have computed items without
    /// storing them.
    cancelled: Mutex<std::collections::HashSet<u64>>,
}

impl Truth {
    fn new(items: u64) -> Self {
        let zeros = vec![0; items as usize];
        Truth {
            generations: Mutex::new(zeros.clone()),
            floor: Mutex::new(zeros),
            writing: Mutex::new(vec![0; items as usize]),
            computed: Mutex::default(),
            cancelled: Mutex::default(),
        }
    }

    /// The body of every call: the current generation of each item asked for.
    async fn load(&self, call: u64, began: &[u64], ids: Vec<u64>, delay_us: u64) -> Result<Vec<(u64, u64)>, String> {
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        let (generations, writing) = {
            let generations = self.generations.lock().unwrap();
            (generations.clone(), self.writing.lock().unwrap().clone())
        };
        let found: Vec<(u64, u64)> = ids.iter().map(|&id| (id, generations[id as usize])).collect();
        let mut computed = self.computed.lock().unwrap();
        let settled = |id: u64, g: u64| writing[id as usize] == 0 && began[id as usize] == g;
        computed.extend(found.iter().map(|&(id, g)| (id, g, call, settled(id, g))));
        Ok(found)
    }
}

/// A namespace whose version key is gone (a flush, an eviction) met by a
/// read that guessed its misses: the locks it took are kept, the versions
/// seeded under them, and the items computed in the same two round trips,
/// where releasing the guessed locks and locking again behind them made
/// the call wait for its own locks.
#[test]
fn a_guessed_lock_over_a_lost_version_seeds_it_and_keeps_the_lock() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![1, 2]).await;
        names(&cache, &asked, "eu", vec![1, 2, 3]).await;
        let mut conn = server.conn();
        let versions: Vec<String> = redis::cmd("KEYS").arg("*#v").query(&mut conn).expect("KEYS");
        assert!(!versions.is_empty());
        let () = redis::cmd("DEL").arg(&versions).query(&mut conn).expect("DEL");
        let got = names(&cache, &asked, "eu", vec![10, 12]).await;
        assert_eq!(got.len(), 2);
        assert_eq!(asked.take(), vec![vec![1, 2], vec![3], vec![10, 12]]);
        let stats = cache.stats().total;
        assert_eq!((stats.lock_waits, stats.lock_timeouts), (0, 0), "{stats:?}");
        assert_eq!(names(&cache, &asked, "eu", vec![10, 12]).await, got, "stored under the seeded versions");
        assert!(asked.take().is_empty());
        assert!(locks_held(&server).is_empty());
    });
}

/// With memory full (`maxmemory`, `noeviction`) Redis refuses every lock,
/// and the `CLAIM` script, but reads work: a page of current items and a
/// new id each time is served from the cache but for the new id, whether
/// the read locks by script (the site's second read) or by guess (from its
/// third on). One refusal failed the whole read and sent every item to the
/// body; a refused guess sent the site to the script, refused whole.
#[test]
fn refused_locks_do_not_fail_the_read() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let other = cache_for(&server, "app");
        let asked = Asked::default();
        names(&cache, &asked, "eu", vec![1]).await;
        // Current, filled by another process.
        names(&other, &asked, "eu", (100..140).collect()).await;
        asked.take();
        let mut conn = server.conn();
        let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg("noeviction").query(&mut conn).expect("");
        let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query(&mut conn).expect("maxmemory");
        for new in 1000..1004 {
            let got = names(&cache, &asked, "eu", (100..140).chain([new]).collect()).await;
            assert_eq!(got.len(), 20 + usize::from(new % 2 == 0), "the even ids");
        }
        assert_eq!(asked.take(), [1000, 1001, 1002, 1003].map(|new| vec![new]), "current items served from the cache");
        assert!(cache.stats().total.server_errors > 0, "the refusals are counted");
        let () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0").query(&mut conn).expect("maxmemory");
    });
}

/// A proxy to `target` that, once `armed`, swallows the reply to the next
/// request holding both a `SET ... NX` and an `MGET` (a read that takes
/// locks) and closes that connection: Redis ran it, the client never heard.
async fn reply_losing_proxy(target: u16, armed: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
            let ((mut from_client, mut to_client), (mut from_server, mut to_server)) =
                (client.into_split(), server.into_split());
            let lose = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (armed, losing) = (armed.clone(), lose.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    let has = |pattern: &[u8]| buf[..n].windows(pattern.len()).any(|w| w == pattern);
                    if has(b"\r\nNX\r\n") && has(b"MGET") && armed.swap(false, SeqCst) {
                        losing.store(true, SeqCst);
                    }
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    if lose.load(SeqCst) {
                        let _ = to_client.shutdown().await;
                        return;
                    }
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A read whose locks Redis took but whose reply was lost, sent again on a
/// new connection: its `SET NX` then finds its own locks. They are
/// released by token and taken again in the next round, where the call
/// waited out the lock timeout for its own locks (and other processes with
/// it).
#[test]
fn a_read_sent_again_after_a_lost_reply_does_not_wait_for_its_own_locks() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let (cache, armed) = behind_a_reply_losing_proxy(&server).await;
        let asked = Asked::default();
        // The second read misses too: the next one takes locks with its read.
        names(&cache, &asked, "eu", vec![1, 2]).await;
        names(&cache, &asked, "eu", vec![1, 2, 3]).await;
        armed.store(true, SeqCst);
        let got = took_less_than_the_lock_timeout(&cache, &armed, names(&cache, &asked, "eu", vec![10, 12])).await;
        assert_eq!(got.len(), 2);
        assert_eq!(asked.take(), vec![vec![1, 2], vec![3], vec![10, 12]]);
        assert!(locks_held(&server).is_empty());
    });
}

/// The same for the locks a page takes after its read, when its site's
/// last read hit everything (`SET NX PX` and an `MGET`, one pipeline).
#[test]
fn locks_sent_again_after_a_lost_reply_do_not_wait_for_themselves() {
    names_site!();
    let server = RedisServer::start();
    run(DEADLINE, async {
        let (cache, armed) = behind_a_reply_losing_proxy(&server).await;
        let asked = Asked::default();
        // The second read hits everything: the next reads, then locks.
        names(&cache, &asked, "eu", vec![1, 2]).await;
        names(&cache, &asked, "eu", vec![1, 2]).await;
        armed.store(true, SeqCst);
        let got =
            took_less_than_the_lock_timeout(&cache, &armed, names(&cache, &asked, "eu", vec![1, 2, 10, 12])).await;
        assert_eq!(got.len(), 3);
        assert_eq!(asked.take(), vec![vec![1, 2], vec![10, 12]]);
        assert!(locks_held(&server).is_empty());
    });
}

/// A cache whose connections go through [`reply_losing_proxy`], with a
/// lock timeout of 5 s, and the proxy's switch.
async fn behind_a_reply_losing_proxy(server: &RedisServer) -> (Cache, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = reply_losing_proxy(server.port(), armed.clone()).await;
    let cache = support::patient_cache(&format!("redis://127.0.0.1:{port}"), "app")
        .lock_timeout(Duration::from_secs(5))
        .build()
        .expect("valid cache settings");
    (cache, armed)
}

/// Runs `call`, which the armed proxy loses a reply of, and checks it did
/// not wait out the lock timeout.
async fn took_less_than_the_lock_timeout<T>(
    cache: &Cache,
    armed: &std::sync::atomic::AtomicBool,
    call: impl Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    let got = call.await;
    let took = started.elapsed();
    assert!(!armed.load(SeqCst), "the proxy lost no reply");
    assert!(took < Duration::from_secs(2), "waited {took:?} for its own locks");
    assert_eq!(cache.stats().total.lock_timeouts, 0);
    got
}

/// splitmix64: the seed's stream for one task.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Bulk calls, single calls, forgets, invalidates and calls dropped at
/// random points, from a seed: no answer is older than the last forget or
/// invalidate of its item that completed before the call began, and with
/// the lock on an item is computed once per generation, except where a
/// dropped call may have computed it without storing it.
/// `MANY_SEED=<seed>` replays a seed's schedule.
#[test]
fn randomized_history_keeps_the_guarantees() {
    history(Shape { processes: 1, items: 24, window: None, faults: false });
}

/// The same history from two processes (caches, each with a site of its
/// own that remembers the items it read), over ids in a window that
/// slides across 400 as the tasks go: new ids keep coming, so reads lock
/// what they guess is missing, and each process meets items the other
/// filled, which it guesses wrong. `MANY_SEED=<seed>` replays.
#[test]
fn randomized_history_of_two_processes_over_new_ids_keeps_the_guarantees() {
    history(Shape { processes: 2, items: 400, window: Some(24), faults: false });
}

/// The two-process history with Redis faults from the seed: connections
/// killed (`CLIENT KILL`, replies lost mid-pipeline) and writes paused
/// (`CLIENT PAUSE WRITE`). No answer is older than a forget or invalidate
/// that returned `Ok`; items may be computed more than once (a lock lost
/// with its connection is taken again), and every lock is gone once its
/// TTL has passed. `MANY_SEED=<seed>` replays the operations (the faults'
/// timing is the machine's).
#[test]
fn randomized_history_with_faults_serves_nothing_stale() {
    history(Shape { processes: 2, items: 400, window: Some(24), faults: true });
}

/// What a randomized history runs against.
#[derive(Clone, Copy)]
struct Shape {
    /// Caches on one server, each with its own `Policy`: processes.
    processes: usize,
    /// Ids `0..items`.
    items: u64,
    /// Ids drawn from a window of this many that slides across `items` as
    /// each task goes; `None`: from all of them.
    window: Option<u64>,
    /// Connections killed and writes paused while the tasks run.
    faults: bool,
}

impl Shape {
    /// An id for a task's operation `index` of [`OPS`].
    fn id(&self, index: u64, draw: u64) -> u64 {
        match self.window {
            None => draw % self.items,
            Some(window) => (index * (self.items - window) / OPS + draw % window) % self.items,
        }
    }
}

/// Operations per task.
const OPS: u64 = 150;

fn history(shape: Shape) {
    let seed = std::env::var("MANY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("randomized history seed {seed}: replay with MANY_SEED={seed} cargo test --test many randomized");
    let server = RedisServer::start();
    run(DEADLINE, async {
        // With faults a lock may outlive its connection: it expires soon.
        let lock_timeout = Duration::from_secs(if shape.faults { 1 } else { 10 });
        let build = || {
            let builder = support::patient_cache(&server.url(), "app").lock_timeout(lock_timeout);
            builder.build().expect("valid cache settings")
        };
        // One cache and one policy (so one site) per process.
        let caches: Vec<Cache> = (0..shape.processes).map(|_| build()).collect();
        let cache = caches[0].clone();
        let policies: Vec<&'static Policy> = (0..shape.processes)
            .map(|_| &*Box::leak(Box::new(Policy::new("history").ttl(Duration::from_secs(60)))))
            .collect();
        let policy = policies[0];
        let truth: &'static Truth = Box::leak(Box::new(Truth::new(shape.items)));
        let violations: &'static Mutex<Vec<String>> = Box::leak(Box::default());
        let tasks: Vec<_> = (0..16u64)
            .map(|task| {
                let process = task as usize % shape.processes;
                let (cache, policy) = (caches[process].clone(), policies[process]);
                tokio::spawn(async move {
                    let mut state = seed ^ task.wrapping_mul(0xA24B_AED4_963E_E407);
                    for index in 0..OPS {
                        let number = task << 32 | index;
                        let op = next(&mut state) % 100;
                        let delay = next(&mut state) % 2_000;
                        if op < 8 {
                            // A write: the item changes, then its entry is forgotten.
                            let id = shape.id(index, next(&mut state));
                            let generation = {
                                let mut generations = truth.generations.lock().unwrap();
                                truth.writing.lock().unwrap()[id as usize] += 1;
                                generations[id as usize] += 1;
                                generations[id as usize]
                            };
                            let forgot = cache.forget::<_, Option<u64>>(policy, &id).await;
                            assert!(shape.faults || forgot.is_ok(), "{forgot:?}");
                            let mut floor = truth.floor.lock().unwrap();
                            if forgot.is_ok() {
                                floor[id as usize] = floor[id as usize].max(generation);
                            }
                            truth.writing.lock().unwrap()[id as usize] -= 1;
                            continue;
                        }
                        if op < 10 {
                            let reached: Vec<u64> = {
                                let mut generations = truth.generations.lock().unwrap();
                                truth.writing.lock().unwrap().iter_mut().for_each(|w| *w += 1);
                                generations.iter_mut().for_each(|g| *g += 1);
                                generations.clone()
                            };
                            let invalidated = cache.invalidate("history").await;
                            assert!(shape.faults || invalidated.is_ok(), "{invalidated:?}");
                            let mut floor = truth.floor.lock().unwrap();
                            if invalidated.is_ok() {
                                floor.iter_mut().zip(reached).for_each(|(f, g)| *f = (*f).max(g));
                            }
                            truth.writing.lock().unwrap().iter_mut().for_each(|w| *w -= 1);
                            continue;
                        }
                        let count = 1 + next(&mut state) % 8;
                        let mut ids: Vec<u64> = (0..count).map(|_| shape.id(index, next(&mut state))).collect();
                        if op < 30 {
                            ids.truncate(1);
                        }
                        let floor = truth.floor.lock().unwrap().clone();
                        // Each item's generation as the call begins; `u64::MAX`
                        // for one a write is under way for.
                        let began: &[u64] = {
                            let generations = truth.generations.lock().unwrap();
                            let writing = truth.writing.lock().unwrap();
                            let began = generations.iter().zip(writing.iter());
                            began.map(|(&g, &w)| if w == 0 { g } else { u64::MAX }).collect::<Vec<_>>().leak()
                        };
                        let answered: Vec<(u64, u64)> = if op < 30 {
                            let id = ids[0];
                            let load = truth.load(number, began, vec![id], delay);
                            let value = async move { load.await.map(|found| found.first().map(|(_, g)| *g)) };
                            match cache.get_or_compute(policy, &id, value).await {
                                Ok(Some(generation)) => vec![(id, generation)],
                                other => panic!("item {id} answered {other:?}"),
                            }
                        } else {
                            let call = cache.get_or_compute_many::<_, u64, String, _, _, _, _, Vec<(u64, u64)>>(
                                policy,
                                ids.clone(),
                                |missing| truth.load(number, began, missing, delay),
                            );
                            if op < 38 {
                                // Dropped at a random point of its flow: half
                                // of them within the first round trip, the read
                                // that also takes the locks of what it misses.
                                let within = if next(&mut state).is_multiple_of(2) { 300 } else { 3_000 };
                                let after = Duration::from_micros(next(&mut state) % within);
                                if let Ok(found) = tokio::time::timeout(after, call).await {
                                    found.expect("no error")
                                } else {
                                    truth.cancelled.lock().unwrap().insert(number);
                                    continue;
                                }
                            } else {
                                call.await.expect("no error")
                            }
                        };
                        let mut distinct = ids.clone();
                        distinct.sort_unstable();
                        distinct.dedup();
                        if answered.len() != distinct.len() {
                            violations.lock().unwrap().push(format!("asked {ids:?}, answered {answered:?}"));
                        }
                        for (id, generation) in answered {
                            if generation < floor[id as usize] {
                                violations.lock().unwrap().push(format!(
                                    "item {id} answered generation {generation} after generation {} was forgotten",
                                    floor[id as usize]
                                ));
                            }
                        }
                    }
                })
            })
            .collect();
        let injected: &'static AtomicUsize = Box::leak(Box::default());
        let faults = shape.faults.then(|| tokio::spawn(inject_faults(server.url(), seed, injected)));
        for task in tasks {
            task.await.expect("a task panicked");
        }
        if let Some(faults) = faults {
            faults.abort();
            // Past the locks' TTL: a lock whose release was lost with its
            // connection has expired.
            tokio::time::sleep(lock_timeout).await;
        }
        // Every lock a dropped call took is released by its guards, well
        // before the lock timeout: a last call over every item is not held up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let locks = locks_held(&server);
        assert!(locks.is_empty(), "seed {seed}: locks left held: {locks:?}");
        let started = std::time::Instant::now();
        let all = cache.get_or_compute_many::<_, u64, String, _, _, _, _, Vec<(u64, u64)>>(
            policy,
            0..shape.items,
            |missing: Vec<u64>| async move { Ok(missing.into_iter().map(|id| (id, u64::MAX)).collect::<Vec<_>>()) },
        );
        assert_eq!(all.await.map(|found| found.len()), Ok(shape.items as usize));
        assert!(started.elapsed() < Duration::from_secs(2), "seed {seed}: a lock held up the last call");
        let violations = violations.lock().unwrap();
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
        let cancelled = truth.cancelled.lock().unwrap();
        let computed = truth.computed.lock().unwrap();
        // Per (item, generation): computations by calls that completed, and
        // by calls dropped after computing (maybe before storing).
        let mut counts: HashMap<(u64, u64), (usize, usize)> = HashMap::new();
        for &(id, generation, call, _) in computed.iter().filter(|c| c.3) {
            let count = counts.entry((id, generation)).or_default();
            if cancelled.contains(&call) { count.1 += 1 } else { count.0 += 1 }
        }
        // With faults, a lock lost with its connection is taken again.
        for (&(id, generation), &(completed, dropped)) in counts.iter().filter(|_| !shape.faults) {
            assert!(
                completed <= 1 + dropped,
                "seed {seed}: item {id} generation {generation} computed {completed} times by completed calls, \
                 {dropped} by dropped ones"
            );
        }
        let stats = cache.stats().total;
        let met: u64 = caches.iter().map(|cache| cache.stats().total.errors()).sum();
        let injected = injected.load(SeqCst);
        println!(
            "{} computations, {} dropped calls, {} lock timeouts, {injected} faults injected, {met} met by calls",
            computed.len(),
            cancelled.len(),
            stats.lock_timeouts
        );
        assert!(!shape.faults || injected > 0, "seed {seed}: no fault was injected");
    });
}

/// Until aborted: every 20 to 120 ms (from `seed`), the server kills its
/// clients' connections or pauses their writes for 10 to 60 ms; counts
/// the faults in `injected`.
async fn inject_faults(url: String, seed: u64, injected: &AtomicUsize) {
    let mut state = seed ^ 0xFA17;
    let client = redis::Client::open(url).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("the fault injector's connection");
    loop {
        tokio::time::sleep(Duration::from_millis(20 + next(&mut state) % 100)).await;
        let mut fault = redis::cmd("CLIENT");
        if next(&mut state).is_multiple_of(2) {
            fault.arg("PAUSE").arg(10 + next(&mut state) % 50).arg("WRITE");
        } else {
            fault.arg("KILL").arg("TYPE").arg("normal").arg("SKIPME").arg("yes");
        }
        if fault.query_async::<redis::Value>(&mut conn).await.is_ok() {
            injected.fetch_add(1, SeqCst);
        }
    }
}

/// On a Redis Cluster: the entries and locks of a prefix share a slot, so
/// the pipelines go to one node; the tag's and the cache-wide versions live
/// elsewhere and are pinned, and invalidating the tag reaches every item.
#[cfg(feature = "cluster")]
#[test]
fn a_bulk_call_works_on_a_cluster() {
    #[cached(ttl = 60, prefix = "tagged", tags("catalog"), batch(ids), skip(asked), cache = cache)]
    async fn tagged(cache: &Cache, asked: &Asked, ids: Vec<u64>) -> HashMap<u64, u64> {
        asked.record(&ids);
        ids.into_iter().map(|id| (id, id * 3)).collect()
    }
    let cluster = support::RedisCluster::start(3);
    run(DEADLINE, async {
        let cache = support::patient_cache(&cluster.urls().join(","), "app").build().expect("valid cache settings");
        let asked = Asked::default();
        assert_eq!(tagged(&cache, &asked, vec![1, 2, 3]).await.len(), 3);
        assert_eq!(tagged(&cache, &asked, vec![3, 4, 1]).await, HashMap::from([(3, 9), (4, 12), (1, 3)]));
        assert_eq!(asked.take(), vec![vec![1, 2, 3], vec![4]]);
        cache.invalidate("catalog").await.expect("invalidate");
        tagged(&cache, &asked, vec![1, 2]).await;
        assert_eq!(asked.take(), vec![vec![1, 2]], "the tag's version is pinned in every entry");
        assert_eq!(cache.stats().total.errors(), 0, "{:?}", cache.stats().total);
    });
}

/// Items other callers in this process are computing are waited for under
/// one bound, not one lock timeout each: a bulk call over eight items whose
/// single-call leaders hang returns after about one lock timeout.
#[test]
fn waits_for_other_callers_items_share_one_deadline() {
    run(Duration::from_secs(60), async {
        let server = RedisServer::start();
        let cache = support::patient_cache(&server.url(), "app")
            .lock_timeout(Duration::from_millis(500))
            .build()
            .expect("valid cache settings");
        let policy = Policy::new("hung").ttl(Duration::from_secs(60));
        let ids: Vec<u64> = (1..=8).collect();
        let mut hung = Vec::new();
        for &id in &ids {
            let (cache, policy) = (cache.clone(), policy.clone());
            hung.push(tokio::spawn(async move {
                cache
                    .get_or_compute(&policy, &id, async {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok::<Option<String>, String>(None)
                    })
                    .await
            }));
        }
        // The single calls lead their flights before the bulk call asks.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let got: Result<HashMap<u64, String>, String> = cache
            .get_or_compute_many(&policy, ids.clone(), |missing: Vec<u64>| async move {
                Ok(missing.into_iter().map(|id| (id, format!("v{id}"))).collect::<Vec<_>>())
            })
            .await;
        let waited = started.elapsed();
        assert_eq!(got.map(|m| m.len()), Ok(8));
        // Eight lock timeouts one after another would be 4 s.
        assert!(waited < Duration::from_millis(2_500), "the bulk call waited {waited:?}");
        for task in hung {
            task.abort();
        }
    });
}

/// The stampede locks held now, by anyone.
fn locks_held(server: &RedisServer) -> Vec<String> {
    redis::cmd("KEYS").arg("*#lock").query(&mut server.conn()).expect("KEYS")
}

/// The server's count of socket reads: one per request or pipeline.
fn reads(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query(conn).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("total_reads_processed:")?.trim().parse().ok())
        .expect("INFO stats has total_reads_processed")
}

/// On one server a bulk call with misses is two round trips: the read,
/// which also takes the locks of the items it misses, and the stores.
#[test]
fn a_bulk_call_with_misses_is_two_round_trips() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = cache_for(&server, "app");
        let asked = Asked::default();
        // Loads the scripts, which the server then has.
        names(&cache, &asked, "eu", vec![2, 4]).await;
        let mut conn = server.conn();
        let before = reads(&mut conn);
        names(&cache, &asked, "eu", vec![2, 4, 6, 8]).await;
        // The second INFO's own read counts too.
        assert_eq!(reads(&mut conn) - before - 1, 2, "round trips of a bulk call with misses");
        assert_eq!(asked.take(), vec![vec![2, 4], vec![6, 8]]);
        assert!(locks_held(&server).is_empty(), "every lock released by its store");
    });
}

/// A bulk call dropped while its read (which takes the locks of its misses)
/// is on the wire: the locks it may hold are released by its guard, so the
/// next caller of those items computes them at once rather than waiting
/// out the lock timeout, and each item is computed once.
#[test]
fn a_call_dropped_during_its_read_releases_its_locks() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache = support::patient_cache(&server.url(), "app")
            .lock_timeout(Duration::from_secs(20))
            .build()
            .expect("valid cache settings");
        let asked = Asked::default();
        // Loads the scripts, and keeps the site expecting misses.
        names(&cache, &asked, "eu", vec![100]).await;
        server.freeze();
        // The read goes out to a server that cannot answer yet.
        let dropped = tokio::time::timeout(Duration::from_millis(200), names(&cache, &asked, "eu", vec![2, 4, 6]));
        assert!(dropped.await.is_err(), "the frozen server answered");
        server.resume();
        // The read runs now and takes the locks: its guard releases them.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let locks = locks_held(&server);
        assert!(locks.is_empty(), "locks left held by the dropped call: {locks:?}");
        let started = std::time::Instant::now();
        assert_eq!(names(&cache, &asked, "eu", vec![2, 4, 6]).await.len(), 3);
        assert!(started.elapsed() < Duration::from_secs(2), "held up by a lock: {:?}", started.elapsed());
        assert_eq!(asked.take(), vec![vec![100], vec![2, 4, 6]], "computed once, by the second call");
    });
}

/// A lock the read took for an item that another caller in this process is
/// computing goes back before the body runs: that caller computes without
/// the lock (it waited past its lock timeout for another process's), and
/// the bulk call waits for its value. Held, the lock would make other
/// processes wait for a call that is not computing the item.
#[test]
fn a_lock_taken_for_an_item_led_in_this_process_goes_back() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let here = cache_for(&server, "app");
        let elsewhere = cache_for(&server, "app");
        let policy = Policy::new("led").ttl(Duration::from_secs(60)).lock_timeout(Duration::from_secs(10));
        // Another process holds item 1's lock for 600 ms, then fails.
        let other = {
            let policy = policy.clone();
            tokio::spawn(async move {
                let body = async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Err::<Option<String>, String>("failed".into())
                };
                elsewhere.get_or_compute(&policy, &1u64, body).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // This process's single call gives up on the lock after 300 ms and
        // computes item 1 without it, for 2 s.
        let single = {
            let here = here.clone();
            let policy = policy.clone().lock_timeout(Duration::from_millis(300));
            tokio::spawn(async move {
                let body = async {
                    tokio::time::sleep(Duration::from_millis(2_000)).await;
                    Ok::<Option<String>, String>(Some("single".into()))
                };
                here.get_or_compute(&policy, &1u64, body).await
            })
        };
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(other.await.expect("other process").is_err());
        assert!(locks_held(&server).is_empty(), "the other lock is gone");
        let bulk = {
            let (here, policy) = (here.clone(), policy.clone());
            tokio::spawn(async move {
                here.get_or_compute_many(&policy, [1u64, 2], |missing: Vec<u64>| async move {
                    Ok::<_, String>(missing.into_iter().map(|id| (id, format!("bulk {id}"))).collect::<Vec<_>>())
                })
                .await
            })
        };
        // The bulk call has read (taking both locks), stored item 2 and is
        // waiting for the single call's item 1.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!bulk.is_finished(), "the bulk call waits for the single call");
        let locks = locks_held(&server);
        assert!(locks.is_empty(), "a lock held by a call that does not compute its item: {locks:?}");
        let found: HashMap<u64, String> = bulk.await.expect("bulk call").expect("no error");
        assert_eq!(found, HashMap::from([(1, "single".into()), (2, "bulk 2".into())]));
        assert_eq!(single.await.expect("single call"), Ok(Some("single".into())));
    });
}

/// A large batch: the read's script reads the entries in slices (Lua's
/// stack holds a few thousand arguments) and its reply is not capped by
/// `max_value_bytes` like an entry's strings.
#[test]
fn a_batch_of_twenty_thousand_items_is_read_and_locked() {
    let server = RedisServer::start();
    run(DEADLINE, async {
        let cache =
            support::patient_cache(&server.url(), "app").max_value_bytes(1024).build().expect("valid cache settings");
        let asked = Asked::default();
        let ids: Vec<u64> = (0..20_000).map(|id| id * 2).collect();
        assert_eq!(names(&cache, &asked, "eu", ids.clone()).await.len(), ids.len());
        assert_eq!(names(&cache, &asked, "eu", ids.clone()).await.len(), ids.len());
        let asked = asked.take();
        assert_eq!((asked.len(), asked[0].len()), (1, ids.len()), "computed once, then all hits");
        let stats = cache.stats().total;
        assert_eq!((stats.errors(), stats.hits, stats.misses), (0, 20_000, 20_000), "{stats:?}");
        assert!(locks_held(&server).is_empty());
    });
}
