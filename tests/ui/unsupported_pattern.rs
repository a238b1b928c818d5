use cache_runtime::cached;

#[cached(ttl = 60)]
async fn area((w, h): (u32, u32)) -> u32 {
    w * h
}

fn main() {}
