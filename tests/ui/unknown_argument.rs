use cache_runtime::cached;

#[cached(ttl = 60, tll = 5)]
async fn price(id: u64) -> u64 {
    id
}

fn main() {}
