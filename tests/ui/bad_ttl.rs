use cache_runtime::cached;

#[cached(ttl = 0)]
async fn zero(id: u64) -> u64 {
    id
}

#[cached(ttl = -5)]
async fn negative(id: u64) -> u64 {
    id
}

#[cached(ttl = "60")]
async fn text(id: u64) -> u64 {
    id
}

#[cached(ttl = 18446744073709551615)]
async fn forever(id: u64) -> u64 {
    id
}

#[cached(ttl = 60, stale_if_error = 400000000)]
async fn stale_for_centuries(id: u64) -> u64 {
    id
}

fn main() {}
