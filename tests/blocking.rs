//! Workers that block: sync work or `block_on` inside a runtime's worker
//! must not stall other callers' lookups. Alone in its binary: it keeps a
//! multi-thread runtime's workers busy, which would slow the timing-bound
//! tests beside it.

mod support;

use cache_runtime::{Cache, cached};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::RedisServer;

#[cached(ttl = 600, prefix = "blocked", cache = cache)]
async fn value(cache: &Cache, id: u32) -> String {
    format!("value {id}")
}

/// Drives `future` on this thread, blocking it: sync-over-async, as code
/// that calls `block_on` inside a runtime's worker does.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

/// A flush spawned while a leader's lookup ends sits in that worker's LIFO
/// slot, which other workers do not steal: if the leader then blocks its
/// worker (CPU work, or `block_on` of another cached call, which queues
/// behind that very flush), the queued callers must not wait on the flush.
/// Each keeps a timer, driven by a free worker, and takes over the lapsed
/// turn. Without their timers, this hung for good (review of 8f627ad).
#[test]
fn leaders_that_block_their_workers_do_not_stall_the_queue() {
    let server = RedisServer::start();
    // A lapse of 2 s: twice connect + command timeouts.
    let cache = Cache::builder()
        .url(server.url())
        .key_prefix("blocked")
        .connect_timeout(Duration::from_millis(500))
        .command_timeout(Duration::from_millis(500))
        .build()
        .expect("valid cache settings");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(3).enable_all().build().expect("runtime");
    // Twice: after the first round's misses the site expects misses and
    // takes locks without looking; the second round's hits reset that.
    runtime.block_on(async {
        for _ in 0..2 {
            for id in 0..200 {
                value(&cache, id).await;
            }
        }
    });
    // The lookups below queue behind the first two while Redis is paused.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(300).arg("ALL").query(&mut server.conn()).expect("CLIENT PAUSE");
    let finished = Arc::new(AtomicUsize::new(0));
    let nested = Arc::new(AtomicUsize::new(0));
    for id in 0..160 {
        let (cache, finished, nested) = (cache.clone(), finished.clone(), nested.clone());
        runtime.spawn(async move {
            assert_eq!(value(&cache, id).await, format!("value {id}"));
            // The first two to finish are the leaders: they block.
            if finished.fetch_add(1, SeqCst) < 2 {
                std::thread::sleep(Duration::from_millis(100));
                assert_eq!(block_on(value(&cache, 199)), "value 199");
                nested.fetch_add(1, SeqCst);
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while nested.load(SeqCst) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = nested.load(SeqCst);
    runtime.shutdown_background();
    assert_eq!(done, 2, "the blocked leaders' own lookups never returned");
}
