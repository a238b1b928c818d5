use cache_runtime::cached;

#[cached(ttl = 60, skip(db))]
async fn price(pool: &str, id: u64) -> u64 {
    let _ = pool;
    id
}

fn main() {}
