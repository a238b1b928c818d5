use cache_runtime::cached;

struct Report {
    rows: u32,
}

#[cached(ttl = 60)]
async fn report(id: u32) -> Result<Report, String> {
    Ok(Report { rows: id })
}

fn main() {}
