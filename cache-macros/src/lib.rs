//! The `#[cached]` attribute of [`cache-runtime`](https://docs.rs/cache-runtime).
//!
//! This crate only parses, validates and rewrites; all caching logic lives
//! in `cache-runtime`, which re-exports the attribute and documents each of
//! its arguments:
//! [`cache_runtime::cached`](https://docs.rs/cache-runtime/latest/cache_runtime/attr.cached.html).
//! Depend on that crate, not on this one: the expansion calls its unstable
//! internals, which is why `cache-runtime` pins this crate to its exact
//! version.

mod attr;
mod bulk;
mod expand;
mod item;

use proc_macro::TokenStream;
use quote::ToTokens;

// No doc comment: rustdoc appends it to the re-export's, and the reference
// lives on the re-export, `cache_runtime::cached`, where its examples run.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    let function = match syn::parse::<item::CachedFn>(item.clone()) {
        Ok(function) => function,
        // Not a function, or one whose signature does not parse: keep the
        // item as written, so the error is the only one.
        Err(error) => {
            let mut tokens = error.into_compile_error();
            tokens.extend(proc_macro2::TokenStream::from(item));
            return tokens.into();
        }
    };
    let expanded = syn::parse::<attr::CachedArgs>(args).and_then(|args| expand::expand(args, &function));
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
