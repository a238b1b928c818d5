//! Concurrent hits share `MGET`s: how many are on the wire at once under
//! load, and that every caller gets its own key's value.
//!
//! Measured on a current-thread runtime, where the order tasks run in does
//! not depend on the machine's load.

mod support;

use cache_runtime::{Cache, cached};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;
use support::RedisServer;

#[cached(ttl = 600, prefix = "batched", cache = cache)]
async fn value(cache: &Cache, id: u32) -> String {
    format!("value {id}")
}

/// Under load two batches are on the wire at once: while one is answered,
/// the callers of the other decode and queue again, so Redis and the client
/// work at the same time. Before, one was, and the client and Redis took
/// turns. Every caller still gets its own key's value.
#[test]
fn two_batches_are_on_the_wire_at_once_and_every_caller_gets_its_own_value() {
    const TASKS: u32 = 16;
    const ROUNDS: u32 = 50;
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("batching")
        .command_timeout(Duration::from_secs(2))
        .build()
        .expect("valid cache settings");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        for id in 0..TASKS {
            value(&cache, id).await;
        }
    });
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut server.conn()).expect("CONFIG RESETSTAT");
    let hits = cache.stats().total.hits;
    let most_on_the_wire = runtime.block_on(async {
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (cache, done) = (cache.clone(), done.clone());
            tokio::spawn(async move {
                let mut most = 0;
                while !done.load(SeqCst) {
                    most = most.max(cache.stats().in_flight.lookups);
                    tokio::task::yield_now().await;
                }
                most
            })
        };
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    for round in 0..ROUNDS {
                        // Each caller its own key per round, none another's.
                        let id = (task + round) % TASKS;
                        assert_eq!(value(&cache, id).await, format!("value {id}"));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a caller panicked");
        }
        done.store(true, SeqCst);
        sampler.await.expect("the sampler panicked")
    });
    let hits = cache.stats().total.hits - hits;
    let mgets = server.command_calls().get("mget").copied().unwrap_or(0);
    assert_eq!(hits, u64::from(TASKS * ROUNDS), "{:?}", cache.stats());
    println!("{hits} hits in {mgets} MGETs: {:.1} per MGET", hits as f64 / mgets.max(1) as f64);
    assert_eq!(most_on_the_wire, 2, "lookups on the wire at once, at most");
    assert_eq!(cache.stats().in_flight, cache_runtime::InFlight::default(), "every turn given back");
}

/// A lookup holds its turn in its caller's future. Parked after one poll
/// (alive, never polled again: a `select!` loser kept for later, a stream
/// nobody drives), it used to hold that turn for good: with every turn held
/// so, each later lookup of the whole cache queued, waited for the queue's
/// deadline, timed out and missed, and nothing was cached, with Redis
/// healthy throughout. Now a turn held past any polled lookup's time is
/// taken over.
#[test]
fn lookups_parked_mid_flight_do_not_stall_the_cache() {
    use cache_runtime::Policy;
    use std::future::Future;
    use std::sync::atomic::AtomicUsize;
    let server = RedisServer::start();
    support::run(Duration::from_secs(30), async {
        // Deadlines a loaded machine meets: a lapse is 2 x (connect + command).
        let cache = Cache::builder()
            .url(server.url())
            .key_prefix("parked")
            .connect_timeout(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(250))
            .build()
            .expect("valid cache settings");
        let policy = Policy::new("parked").ttl(Duration::from_secs(60));
        assert_eq!(cache.get_or_compute(&policy, &"warm", async { Ok::<_, std::io::Error>(0) }).await.unwrap(), 0);
        // More than there are turns: the first take them, the rest queue.
        let ids: Vec<u32> = (0..4).collect();
        let mut parked: Vec<_> = ids
            .iter()
            .map(|n| Box::pin(cache.get_or_compute(&policy, n, async move { Ok::<_, std::io::Error>(*n) })))
            .collect();
        for lookup in &mut parked {
            let pending =
                std::future::poll_fn(|cx| std::task::Poll::Ready(lookup.as_mut().poll(cx).is_pending())).await;
            assert!(pending, "its lookup is on the wire or queued");
        }
        let computed = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        for _ in 0..5 {
            let later = async {
                computed.fetch_add(1, SeqCst);
                Ok::<_, std::io::Error>(7)
            };
            assert_eq!(cache.get_or_compute(&policy, &"later", later).await.unwrap(), 7);
        }
        let elapsed = started.elapsed();
        let stats = cache.stats().total;
        assert_eq!(computed.load(SeqCst), 1, "computed once, then hits: {stats:?}");
        assert_eq!(stats.timeouts, 0, "{stats:?}");
        // The first waits out one lapse (1.5 s), then takes a turn over;
        // the others find the next one lapsed already. Before, each waited
        // for the queue's deadline (3 s) and missed.
        assert!(elapsed < Duration::from_millis(2500), "five calls took {elapsed:?}");
        drop(parked);
    });
}
