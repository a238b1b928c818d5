//! What the expansion keeps of the function as written: its inner
//! attributes, and a runtime reached through a re-export (`crate = "..."`).
//! Memory-only caches: no Redis needed.

// The inner attributes below must still apply to their functions: an
// unused variable would fail this file's build.
#![deny(warnings)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// What a platform's facade crate would hold: `pub use cache_runtime;`.
mod platform {
    pub mod deps {
        pub use cache_runtime as cache;
    }
}

use platform::deps::cache::{Cache, cached};

// A path relative to this module, as written in the attribute.
#[cached(crate = "platform::deps::cache", ttl = 60, prefix = "relative", cache = cache, skip(calls))]
async fn relative(cache: &Cache, calls: &AtomicUsize, id: u64) -> Result<u64, String> {
    calls.fetch_add(1, SeqCst);
    Ok(id * 2)
}

mod nested {
    use super::platform::deps::cache::{Cache, cached};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    // An absolute path from a nested module, through every part of the
    // expansion: a method, generics, `codec`, `refresh_ahead`.
    pub struct Prices {
        pub cache: Cache,
        pub calls: Arc<AtomicUsize>,
    }

    impl Prices {
        #[cached(
            crate = "crate::platform::deps::cache",
            ttl = 60,
            prefix = "absolute",
            codec = "json",
            refresh_ahead = 0.5,
            cache = self.cache,
            skip(self)
        )]
        pub async fn price<const N: usize>(self: Arc<Self>, id: u64) -> Option<u64> {
            self.calls.fetch_add(1, SeqCst);
            Some(id * N as u64)
        }
    }
}

#[cached(ttl = 60, prefix = "inner", cache = cache)]
async fn inner_attributes(cache: &Cache, id: u64) -> u64 {
    #![allow(unused_variables)]
    #![doc = "inner attributes are kept inside the body"]
    let unused = id + 1;
    id * 2
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

#[test]
fn the_runtime_is_reached_through_a_relative_crate_path() {
    runtime().block_on(async {
        let cache = Cache::builder().build().expect("a memory-only cache");
        let calls = AtomicUsize::new(0);
        assert_eq!(relative(&cache, &calls, 7).await, Ok(14));
        assert_eq!(relative(&cache, &calls, 7).await, Ok(14));
        assert_eq!(calls.load(SeqCst), 1, "the second call is a hit");
        assert_eq!(cache.stats().prefix("relative").map(|c| c.hits), Some(1));
    });
}

#[test]
fn the_runtime_is_reached_through_an_absolute_crate_path() {
    runtime().block_on(async {
        let cache = Cache::builder().build().expect("a memory-only cache");
        let calls = Arc::new(AtomicUsize::new(0));
        let prices = Arc::new(nested::Prices { cache: cache.clone(), calls: calls.clone() });
        assert_eq!(prices.clone().price::<3>(5).await, Some(15));
        assert_eq!(prices.clone().price::<3>(5).await, Some(15));
        assert_eq!(prices.clone().price::<4>(5).await, Some(20), "another instantiation, another entry");
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(cache.stats().prefix("absolute").map(|c| c.hits), Some(1));
    });
}

#[test]
fn inner_attributes_stay_inside_the_function() {
    runtime().block_on(async {
        let cache = Cache::builder().build().expect("a memory-only cache");
        assert_eq!(inner_attributes(&cache, 21).await, 42);
        assert_eq!(inner_attributes(&cache, 21).await, 42);
        assert_eq!(cache.stats().prefix("inner").map(|c| c.hits), Some(1));
    });
}
