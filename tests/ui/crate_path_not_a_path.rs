use cache_runtime::cached;

#[cached(crate = "my reexport", ttl = 60)]
async fn price(id: u64) -> u64 {
    id
}

#[cached(crate = 42, ttl = 60)]
async fn stock(id: u64) -> u64 {
    id
}

#[cached(crate = "rt::<u8>", ttl = 60)]
async fn rating(id: u64) -> u64 {
    id
}

fn main() {
    let _ = (price(1), stock(1), rating(1));
}
