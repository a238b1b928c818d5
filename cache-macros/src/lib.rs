//! The `#[cached]` attribute of [`cache-runtime`](https://docs.rs/cache-runtime).
//!
//! This crate only parses, validates and rewrites; all caching logic lives
//! in `cache-runtime`, which re-exports the attribute. Depend on that crate,
//! not on this one.

mod attr;
mod expand;

use proc_macro::TokenStream;
use quote::ToTokens;

/// Caches an async function in Redis; see `cache_runtime::cached`.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    let function = syn::parse_macro_input!(item as syn::ItemFn);
    let expanded = syn::parse::<attr::CachedArgs>(args).and_then(|args| expand::expand(args, function.clone()));
    match expanded {
        Ok(tokens) => tokens.into(),
        // Keep the function as written next to the errors, so callers do
        // not drown the real mistake in "cannot find function" errors.
        Err(errors) => {
            let mut tokens = errors.into_compile_error();
            function.to_tokens(&mut tokens);
            tokens.into()
        }
    }
}
