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
        assert_eq!(second, HashMap::from([(4, "eu-4".into()), (6, "eu-6".into()), (8, "eu-8".into()), (10, "eu-10".into())]));
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
