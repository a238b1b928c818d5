use cache_runtime::cached;

#[cached(ttl = 0, jitter = 2.0, codec = "xml", prefix = "has space")]
async fn price(id: u64) -> u64 {
    id
}

fn main() {}
