//! What a hit allocates, against a real Redis: not the body. A body's
//! future is as large as its deepest state (a buffer, a database query's
//! future held across an await); a hit never runs it, so it must not
//! allocate or copy it either. One test per binary: the allocator's
//! record is process-wide.

#[path = "support/largest.rs"]
mod largest;
mod support;

use cache_runtime::{Cache, cached};
use largest::LARGEST;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use support::{RedisServer, run};

const BUFFER: usize = 64 << 10;

static COMPUTED: AtomicUsize = AtomicUsize::new(0);

/// Holds a 64 KiB buffer across an await, so its future is at least that.
#[cached(ttl = 60, prefix = "big_body", cache = cache)]
async fn big_body(cache: &Cache, id: u32) -> u32 {
    COMPUTED.fetch_add(1, SeqCst);
    let buffer = [id as u8; BUFFER];
    tokio::task::yield_now().await;
    black_box(&buffer)[BUFFER - 1] as u32 + id
}

#[test]
fn a_hit_allocates_nothing_the_size_of_the_body() {
    // Unoptimized builds move the body's future on the stack a few times.
    let thread = std::thread::Builder::new().stack_size(16 << 20).spawn(hits_of_a_big_body);
    thread.expect("thread").join().expect("the test's thread");
}

fn hits_of_a_big_body() {
    let server = RedisServer::start();
    run(Duration::from_secs(30), async {
        let cache = support::patient_cache(&server.url(), "alloc").build().expect("cache");
        assert_eq!(big_body(&cache, 1).await, 2);
        assert_eq!(big_body(&cache, 1).await, 2);
        assert_eq!(COMPUTED.load(SeqCst), 1, "the second call hit");
        // Nor does the call's own future, which callers box or spawn.
        let size = std::mem::size_of_val(&big_body(&cache, 1));
        assert!(size < BUFFER / 4, "a cached call's future is {size} bytes");
        LARGEST.store(0, SeqCst);
        for _ in 0..10 {
            assert_eq!(big_body(&cache, 1).await, 2);
        }
        let largest = LARGEST.load(SeqCst);
        println!("the largest allocation of 10 hits: {largest} bytes");
        assert_eq!(COMPUTED.load(SeqCst), 1);
        assert!(largest < BUFFER / 4, "a hit allocated {largest} bytes for a body of {BUFFER}");

        // Bulk hits through a `Policy` made per call (as the docs' example
        // of `get_or_compute_many` does): a site that reads once remembers
        // nothing, so it allocates no table of recent items (32 KiB).
        let page = || async {
            let policy = cache_runtime::Policy::new("alloc_page").ttl(Duration::from_secs(60));
            let found = cache.get_or_compute_many::<_, u32, std::io::Error, _, _, _, _, Vec<(u32, u32)>>(
                &policy,
                0..20u32,
                |missing: Vec<u32>| async move { Ok(missing.into_iter().map(|id| (id, id)).collect::<Vec<_>>()) },
            );
            assert_eq!(found.await.map(|found| found.len()).ok(), Some(20));
        };
        page().await;
        LARGEST.store(0, SeqCst);
        for _ in 0..10 {
            page().await;
        }
        let largest = LARGEST.load(SeqCst);
        println!("the largest allocation of 10 bulk hits: {largest} bytes");
        assert!(largest < 16 << 10, "a bulk hit allocated {largest} bytes");
    });
}
