//! Turning a validated `async fn` into a thin call into the runtime.
//!
//! The function keeps its signature; its body moves into an `async` block
//! that the runtime runs on a miss. Everything the expansion names is an
//! absolute path (the runtime's through `crate = ...`, one token stream), and
//! its locals use mixed-site hygiene, so nothing in the user's body can see
//! or shadow them.

use crate::attr::{CachedArgs, Codec, Compress, Errors};
use crate::item::CachedFn;
use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, GenericParam, Ident, Pat, ReturnType, Type};

/// What goes into the key besides the function's identity.
enum KeyParts<'a> {
    /// `key = EXPR`.
    Expr(&'a syn::Expr),
    /// Every parameter that is not skipped: its name, and its type's span
    /// for errors about it.
    Params(Vec<(Ident, Span)>),
}

pub(crate) fn expand(args: CachedArgs, function: &CachedFn) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let sig = &function.sig;
    if sig.asyncness.is_none() {
        errors.at(sig.fn_token.span(), "#[cached] caches async functions: add `async` to this `fn`");
    }
    if let Some(variadic) = &sig.variadic {
        errors.at(variadic.span(), "#[cached] does not support variadic functions");
    }
    if let ReturnType::Type(_, ty) = &sig.output
        && let Type::ImplTrait(_) = &**ty
    {
        errors.at(ty.span(), "#[cached] cannot store an `impl Trait`: name the concrete type");
    }
    let key_parts = key_parts(&args, function, &mut errors);
    if args.refresh_ahead.is_some() {
        check_owned_inputs(function, &mut errors);
    }
    let batch = crate::bulk::find(&args, function, &mut errors);
    errors.finish()?;
    Ok(emit(&args, function, key_parts, batch.as_ref()))
}

/// What to hash; mistakes are recorded in `errors`.
fn key_parts<'a>(args: &'a CachedArgs, function: &CachedFn, errors: &mut Errors) -> KeyParts<'a> {
    let mut names: Vec<Ident> = Vec::new();
    let mut parts = Vec::new();
    for input in &function.sig.inputs {
        match input {
            FnArg::Receiver(receiver) => {
                let ident = Ident::new("self", receiver.self_token.span);
                let skipped = args.skip.iter().any(|s| s == "self");
                if !skipped && args.key.is_none() {
                    errors.at(
                        receiver.self_token.span,
                        "`self` is not hashed silently: add `skip(self)` if the result does not depend on it, \
                         or name what it contributes with `key = (self.id, ...)`",
                    );
                }
                names.push(ident);
            }
            FnArg::Typed(typed) => match &*typed.pat {
                Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => {
                    let ident = &pat.ident;
                    names.push(ident.clone());
                    // The parameter that `cache = param` names is a handle, never data.
                    let is_cache_handle = args.cache.as_ref().and_then(as_ident).is_some_and(|c| c == ident);
                    if !is_cache_handle && !args.skip.iter().any(|s| s == ident) {
                        parts.push((ident.clone(), typed.ty.span()));
                    }
                }
                other => {
                    if args.key.is_none() {
                        errors.at(
                            other.span(),
                            "#[cached] hashes arguments by name: bind this parameter to a plain name, \
                             or choose the key with `key = ...`",
                        );
                    }
                }
            },
        }
    }
    for skipped in &args.skip {
        if !names.iter().any(|n| n == skipped) {
            errors.at(skipped.span(), format!("`skip` names `{skipped}`, which is not a parameter of this function"));
        }
    }
    match &args.key {
        Some(expr) => KeyParts::Expr(expr),
        None => KeyParts::Params(parts),
    }
}

/// `refresh_ahead` runs the body again after the call has returned, in a
/// task of its own: nothing it uses may be borrowed from the caller.
fn check_owned_inputs(function: &CachedFn, errors: &mut Errors) {
    const WHY: &str = "`refresh_ahead` renews entries after the call has returned";
    for param in &function.sig.generics.params {
        if let GenericParam::Lifetime(lifetime) = param {
            errors.at(lifetime.span(), format!("{WHY}, so the function cannot have lifetime parameters"));
        }
    }
    for input in &function.sig.inputs {
        match input {
            FnArg::Receiver(receiver) if receiver.reference.is_some() || borrows(&receiver.ty) => {
                errors.push(syn::Error::new_spanned(
                    receiver,
                    format!("{WHY}, so it cannot borrow `self`: take `self` by value (an `Arc`, a cheap handle)"),
                ))
            }
            FnArg::Typed(typed) if borrows(&typed.ty) => {
                let name = match &*typed.pat {
                    Pat::Ident(pat) => format!("`{}`", pat.ident),
                    _ => "this parameter".to_owned(),
                };
                errors.push(syn::Error::new_spanned(
                    &typed.ty,
                    format!("{WHY}, so {name} cannot be borrowed: take it by value (an `Arc`, a pool handle)"),
                ));
            }
            _ => {}
        }
    }
}

/// Whether a type holds a reference or names a lifetime.
fn borrows(ty: &Type) -> bool {
    struct Finder(bool);
    impl<'ast> syn::visit::Visit<'ast> for Finder {
        fn visit_type_reference(&mut self, _: &'ast syn::TypeReference) {
            self.0 = true;
        }
        fn visit_lifetime(&mut self, lifetime: &'ast syn::Lifetime) {
            self.0 |= lifetime.ident != "static";
        }
    }
    let mut finder = Finder(false);
    syn::visit::Visit::visit_type(&mut finder, ty);
    finder.0
}

fn as_ident(expr: &syn::Expr) -> Option<&Ident> {
    match expr {
        syn::Expr::Path(p) if p.qself.is_none() => p.path.get_ident(),
        _ => None,
    }
}

fn emit(
    args: &CachedArgs,
    function: &CachedFn,
    key_parts: KeyParts<'_>,
    batch: Option<&crate::bulk::Batch<'_>>,
) -> TokenStream {
    let CachedFn { outer_attrs, vis, sig, inner_attrs, body: stmts, .. } = function;
    let krate = args.crate_path(Span::call_site());
    let hygienic = |name: &str| Ident::new(name, Span::mixed_site());
    let (key, hasher, kind, site, cache, h) = (
        hygienic("__cache_key"),
        hygienic("__cache_hasher"),
        hygienic("__cache_kind"),
        hygienic("__CACHE_PLAN"),
        hygienic("__cache"),
        hygienic("__cache_h"),
    );
    let (identity, anchor) = (hygienic("__CACHE_IDENTITY"), hygienic("__cache_anchor"));
    let cell = hygienic("__CACHE_CELL");

    let output = match &sig.output {
        ReturnType::Default => quote! { () },
        ReturnType::Type(_, ty) => ty.to_token_stream(),
    };
    let output_span = match &sig.output {
        ReturnType::Default => sig.ident.span(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    // The return type as written is part of the identity: changing it
    // changes every key, so old entries of another type are never decoded.
    let output_text = output.to_string();
    let version = args.version.unwrap_or(1);

    let type_params = sig.generics.params.iter().filter_map(|param| match param {
        GenericParam::Type(t) => {
            let ident = &t.ident;
            Some(quote! { #hasher.part(::core::any::type_name::<#ident>().as_bytes()); })
        }
        _ => None,
    });
    let const_params = sig.generics.params.iter().filter_map(|param| match param {
        GenericParam::Const(c) => {
            let ident = &c.ident;
            Some(quote! { .and_then(|#h| #h.arg(&#ident)) })
        }
        _ => None,
    });
    let chain = |parts: Vec<(Ident, Span)>| -> Vec<TokenStream> {
        parts.into_iter().map(|(ident, span)| quote_spanned! {span=> .and_then(|#h| #h.arg(&#ident)) }).collect()
    };
    // A bulk call hashes the arguments before its items here, and those
    // after them into a tail: each item's key goes in between.
    let (args_chain, tail_chain) = match (key_parts, batch) {
        (KeyParts::Expr(expr), _) => {
            let span = expr.span();
            (vec![quote_spanned! {span=> .and_then(|#h| #h.arg(&(#expr))) }], Vec::new())
        }
        (KeyParts::Params(parts), Some(batch)) => {
            let (before, after) = crate::bulk::around(parts, batch.ident);
            (chain(before), chain(after))
        }
        (KeyParts::Params(parts), None) => (chain(parts), Vec::new()),
    };

    let prefix = match &args.prefix {
        Some(prefix) => prefix.to_token_stream(),
        None => {
            let name = sig.ident.to_string();
            quote! { ::core::concat!(::core::module_path!(), "::", #name) }
        }
    };
    let tags = &args.tags;
    // The call site's rules, as the `Plan` the runtime reads: built at
    // compile time, so a call converts nothing.
    let duration = |value: Option<TokenStream>| match value {
        Some(value) => quote! { ::core::option::Option::Some(#value) },
        None => quote! { ::core::option::Option::None },
    };
    let ttl = duration(args.ttl_secs.filter(|s| *s > 0).map(|s| quote! { ::core::time::Duration::from_secs(#s) }));
    let jitter = args.jitter.unwrap_or(0.0);
    let lock = args.lock.unwrap_or(true);
    let lock_timeout = duration(
        args.lock_timeout_ms.filter(|ms| *ms > 0).map(|ms| quote! { ::core::time::Duration::from_millis(#ms) }),
    );
    let local_ttl = duration(match (args.local_ttl_ms.filter(|ms| *ms > 0), args.local) {
        (Some(ms), _) => Some(quote! { ::core::time::Duration::from_millis(#ms) }),
        (None, Some(true)) => Some(quote! { ::core::time::Duration::MAX }),
        (None, _) => None,
    });
    let refresh_ahead = args.refresh_ahead.unwrap_or(0.0);
    let stale_if_error =
        duration(args.stale_if_error_secs.filter(|s| *s > 0).map(|s| quote! { ::core::time::Duration::from_secs(#s) }));
    let codec = match args.codec.unwrap_or(Codec::Bincode) {
        Codec::Bincode => quote! { #krate::Codec::Bincode },
        Codec::Json => quote! { #krate::Codec::Json },
    };
    let compress = match args.compress {
        None => quote! { ::core::option::Option::None },
        Some((compress, span)) => {
            // Spanned on the name: `zstd` without the runtime's feature
            // `zstd` is an error there.
            let krate = args.crate_path(span);
            let variant = match compress {
                Compress::None => quote_spanned! {span=> None },
                Compress::Lz4 => quote_spanned! {span=> Lz4 },
                Compress::Zstd => quote_spanned! {span=> Zstd },
            };
            quote_spanned! {span=> ::core::option::Option::Some(#krate::Compression::#variant) }
        }
    };
    let (bind_cache, cache_ref) = match &args.cache {
        Some(expr) => (
            {
                let krate = args.crate_path(expr.span());
                quote_spanned! {expr.span()=> let #cache = #krate::__private::resolve_cache(&(#expr)); }
            },
            quote! { ::core::option::Option::Some(&#cache) },
        ),
        None => (quote! {}, quote! { ::core::option::Option::None }),
    };
    let select_kind = {
        let krate = args.crate_path(output_span);
        quote_spanned! {output_span=>
            #krate::__private::cacheable::<#output, _>({
                #[allow(unused_imports)]
                use #krate::__private::{PlainTag as _, ResultTag as _};
                (&#krate::__private::Tag::<#output>::new()).kind()
            })
        }
    };
    let statements = quote! {
        // Pins the block's output type, so `?` and `return` in the
        // body infer exactly as they did in the function.
        #[allow(unreachable_code, clippy::diverging_sub_expression)]
        if false {
            let __cache_unreachable: #output = loop {};
            return __cache_unreachable;
        }
        #stmts
    };
    let body = quote! { async move { #statements } };
    let tail = hygienic("__cache_tail");
    let call = if let Some(batch) = batch {
        let krate_at_output = args.crate_path(output_span);
        let emit = crate::bulk::Emit {
            krate: &krate,
            krate_at_output: &krate_at_output,
            output: &output,
            output_span,
            cache_ref: &cache_ref,
            site: &site,
            head: &key,
            tail: &tail,
            skip_absent: args.skip_absent.unwrap_or(false),
            body: &statements,
        };
        crate::bulk::call(batch, emit)
    } else if args.refresh_ahead.is_some() {
        // The closure owns the arguments, so the body can run again in a
        // background task after this call has returned.
        quote! { #krate::__private::call_renewable(#cache_ref, &#site, #key, #kind, move || #body).await }
    } else {
        // A maker, not the future: a hit then carries the arguments, not
        // the body's future at its deepest state.
        quote! { #krate::__private::call(#cache_ref, &#site, #key, #kind, move || #body).await }
    };

    // A single call's key, or a bulk call's hasher before its items.
    let (finish, bind_tail, bind_kind) = match batch {
        Some(_) => (
            quote! { .map(|#h| #h.clone()) },
            quote! {
                let #tail = {
                    let mut #hasher = #krate::__private::KeyTail::new();
                    ::core::result::Result::Ok::<_, #krate::Unencodable>(&mut #hasher)
                        #(#tail_chain)*
                        .map(|#h| #h.clone())
                };
            },
            quote! {},
        ),
        None => (quote! { .map(|#h| #h.finish()) }, quote! {}, quote! { let #kind = #select_kind; }),
    };
    quote! {
        #(#outer_attrs)*
        #vis #sig {
            // Where they were written: they apply to the whole function.
            #(#inner_attrs)*
            let #key = {
                static #identity: #krate::__private::IdentityCell =
                    #krate::__private::IdentityCell::new();
                // A closure's type name carries every generic parameter of
                // the function and of its impl, instantiated.
                let #anchor = || ();
                let mut #hasher =
                    #identity.hasher(::core::any::type_name_of_val(&#anchor), #version, #output_text);
                #(#type_params)*
                ::core::result::Result::Ok::<_, #krate::Unencodable>(&mut #hasher)
                    #(#const_params)*
                    #(#args_chain)*
                    #finish
            };
            #bind_tail
            #bind_kind
            static #cell: #krate::__private::SiteCell = #krate::__private::SiteCell::new();
            static #site: #krate::__private::Plan<'static> = #krate::__private::Plan {
                prefix: #prefix,
                tags: &[#(::std::borrow::Cow::Borrowed(#tags)),*],
                ttl: #ttl,
                jitter: #jitter,
                codec: #codec,
                compress: #compress,
                lock: #lock,
                lock_timeout: #lock_timeout,
                local_ttl: #local_ttl,
                refresh_ahead: #refresh_ahead,
                stale_if_error: #stale_if_error,
                site: &#cell,
            };
            #bind_cache
            #call
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(args: &str, function: &str) -> String {
        let args: CachedArgs = syn::parse_str(args).expect("valid arguments");
        let function: CachedFn = syn::parse_str(function).expect("a function");
        expand(args, &function).expect("expands").to_string()
    }

    const EVERY_PATH: &str = "cache = cache, refresh_ahead = 0.5, codec = \"json\", ttl = 5";
    const FUNCTION: &str = "async fn f<T: Clone, const N: usize>(cache: Cache, x: u32) -> Result<u32, E> { Ok(x) }";

    #[test]
    fn every_runtime_path_goes_through_crate() {
        let default = expand_str(EVERY_PATH, FUNCTION);
        assert!(default.contains(":: cache_runtime :: __private"), "{default}");
        let renamed = expand_str(&format!("crate = \"my_reexport::rt\", {EVERY_PATH}"), FUNCTION);
        assert!(!renamed.contains("cache_runtime"), "a path escaped `crate`: {renamed}");
        assert!(renamed.contains("my_reexport :: rt :: __private :: call_renewable"), "{renamed}");
    }

    #[test]
    fn inner_attributes_stay_inside_the_body() {
        let expanded = expand_str("ttl = 5", "#[inline] async fn f() -> u32 { #![allow(unused_variables)] 1 }");
        let (before, after) = expanded.split_once('{').expect("a body");
        assert!(before.starts_with("# [inline]") && !before.contains("allow"), "{before}");
        assert!(after.trim_start().starts_with("# ! [allow (unused_variables)]"), "{after}");
    }
}
