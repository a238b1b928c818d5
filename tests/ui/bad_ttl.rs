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

fn main() {}
