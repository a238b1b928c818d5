use cache_runtime::cached;

#[cached(ttl = 60)]
fn price(id: u64) -> u64 {
    id
}

fn main() {}
