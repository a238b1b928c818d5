use cache_runtime::cached;

#[cached(ttl = 60, local = false, local_ttl = 5)]
async fn a(id: u64) -> u64 {
    id
}

#[cached(ttl = 10, local_ttl = 30)]
async fn b(id: u64) -> u64 {
    id
}

#[cached(ttl = 60, refresh_ahead = 1.5, stale_if_error = 0)]
async fn c(id: u64) -> u64 {
    id
}

#[cached(ttl = 60, local = "yes", refresh_ahead = 1)]
async fn d(id: u64) -> u64 {
    id
}

fn main() {}
