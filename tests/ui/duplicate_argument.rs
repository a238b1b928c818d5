use cache_runtime::cached;

#[cached(ttl = 60, prefix = "a", ttl = 30)]
async fn price(id: u64) -> u64 {
    id
}

fn main() {}
