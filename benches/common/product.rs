//! The value the benchmarks cache: one product row, about 100 bytes
//! encoded. One definition, so every bench measures the same bytes.

use serde::{Deserialize, Serialize};

/// About 100 bytes encoded, like a typical row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: u32,
    pub sku: String,
    pub name: String,
    pub price_cents: u64,
    pub stock: u32,
    pub tags: Vec<String>,
}

impl Product {
    pub fn new(id: u32) -> Self {
        Product {
            id,
            sku: format!("SKU-{id:08}"),
            name: format!("Stainless steel water bottle, {id} ml"),
            price_cents: 1999 + u64::from(id),
            stock: id % 50,
            tags: vec!["kitchen".into(), "outdoor".into(), "gift".into()],
        }
    }
}
