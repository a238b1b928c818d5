use cache_runtime::cached;

mod deps {}

#[cached(crate = "deps::cache_runtime", ttl = 60)]
async fn price(id: u64) -> u64 {
    id
}

fn main() {
    let _ = price(1);
}
