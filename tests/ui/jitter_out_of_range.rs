use cache_runtime::cached;

#[cached(ttl = 60, jitter = 0.7)]
async fn price(id: u64) -> u64 {
    id
}

fn main() {}
