//! `batch(ids)`: a bulk call, one call for many items, each cached as a
//! single call with that item in place of the items would be. The macro
//! finds the items' parameter, hashes the other arguments around it, and
//! hands the runtime the items and a body it can run with only the
//! missing ones; everything else is the runtime's (`call/bulk/`).

use crate::attr::{CachedArgs, Errors};
use crate::item::CachedFn;
use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, Pat, Type};

/// The items' parameter.
pub(crate) struct Batch<'a> {
    pub ident: &'a Ident,
    pub ty: &'a Type,
    pub mutable: bool,
    /// The other parameters bound to names, which the body may use: each
    /// run of the body gets its own copy.
    pub others: Vec<(&'a Ident, bool, Span)>,
}

/// The items' parameter that `batch(..)` names; mistakes go to `errors`.
pub(crate) fn find<'a>(args: &CachedArgs, function: &'a CachedFn, errors: &mut Errors) -> Option<Batch<'a>> {
    let name = args.batch.as_ref()?;
    let mut found = None;
    let mut others = Vec::new();
    for input in &function.sig.inputs {
        let FnArg::Typed(typed) = input else { continue };
        let Pat::Ident(pat) = &*typed.pat else { continue };
        if pat.ident == *name {
            found = Some((pat, &*typed.ty));
        } else {
            others.push((&pat.ident, pat.mutability.is_some(), typed.ty.span()));
        }
    }
    let Some((pat, ty)) = found else {
        errors.at(name.span(), format!("`batch` names `{name}`, which is not a parameter of this function"));
        return None;
    };
    if args.skip.iter().any(|s| s == name) {
        errors
            .at(name.span(), format!("`{name}` holds the items, which are part of every item's key: do not `skip` it"));
    }
    Some(Batch { ident: &pat.ident, ty, mutable: pat.mutability.is_some(), others })
}

/// Hashed parameters, each with the span of its type.
type Parts = Vec<(Ident, Span)>;

/// Splits the hashed parameters around the items: those before and those
/// after.
pub(crate) fn around(parts: Parts, batch: &Ident) -> (Parts, Parts) {
    let at = parts.iter().position(|(ident, _)| ident == batch).unwrap_or(parts.len());
    let mut before = parts;
    let after = before.split_off(at);
    (before, after.into_iter().filter(|(ident, _)| ident != batch).collect())
}

/// What the expansion needs to emit a bulk call.
pub(crate) struct Emit<'a> {
    pub krate: &'a TokenStream,
    /// The runtime's path spanned at the return type, for the checks made there.
    pub krate_at_output: &'a TokenStream,
    pub output: &'a TokenStream,
    pub output_span: Span,
    pub cache_ref: &'a TokenStream,
    pub site: &'a Ident,
    pub head: &'a Ident,
    pub tail: &'a Ident,
    pub skip_absent: bool,
    /// The body's statements, with the output type pinned.
    pub body: &'a TokenStream,
}

/// The bulk call: the items read from their parameter, the output kind
/// checked at the return type, and a body that rebuilds the parameter from
/// the missing items.
pub(crate) fn call(batch: &Batch<'_>, emit: Emit<'_>) -> TokenStream {
    let Emit { krate, krate_at_output, output, output_span, cache_ref, site, head, tail, skip_absent, body } = emit;
    let hygienic = |name: &str| Ident::new(name, Span::mixed_site());
    let (items, kind, missing, owned) =
        (hygienic("__cache_items"), hygienic("__cache_kind"), hygienic("__cache_missing"), hygienic("__cache_owned"));
    let (ident, ty) = (batch.ident, batch.ty);
    let ty_span = ty.span();
    let mutable = batch.mutable.then(|| quote! { mut });
    // Items come out of the parameter by value; borrowed ones are cloned.
    let (read, rebuild) = match ty {
        Type::Reference(reference) => {
            let elem = &reference.elem;
            let rebuild = match &**elem {
                Type::Slice(_) => quote! { let #mutable #ident = &#missing[..]; },
                _ => quote_spanned! {ty_span=>
                    let #owned: #elem = ::core::iter::FromIterator::from_iter(#missing);
                    let #mutable #ident = &#owned;
                },
            };
            let read = quote_spanned! {ty_span=>
                ::core::iter::Iterator::collect(::core::iter::Iterator::cloned(::core::iter::IntoIterator::into_iter(#ident)))
            };
            (read, rebuild)
        }
        _ => (
            quote_spanned! {ty_span=> ::core::iter::Iterator::collect(::core::iter::IntoIterator::into_iter(#ident)) },
            quote_spanned! {ty_span=> let #mutable #ident: #ty = ::core::iter::FromIterator::from_iter(#missing); },
        ),
    };
    let copies = batch.others.iter().map(|(other, mutable, span)| {
        let mutable = mutable.then(|| quote! { mut });
        quote_spanned! {*span=>
            #[allow(unused_variables, unused_mut)]
            let #mutable #other = #krate::__private::again(&#other);
        }
    });
    // The items' name, as the return type's tokens: a mismatch between the
    // two is reported there.
    let items_at_output = Ident::new("__cache_items", Span::mixed_site().located_at(output_span));
    let select_kind = quote_spanned! {output_span=>
        #krate_at_output::__private::many_kind::<#output, _, _>({
            #[allow(unused_imports)]
            use #krate_at_output::__private::{ManyPlainTag as _, ManyResultTag as _};
            (&#krate_at_output::__private::Tag::<#output>::new()).many_kind()
        }, #items_at_output)
    };
    let absent = if skip_absent {
        quote! { Skip }
    } else {
        quote! { Cache }
    };
    quote! {
        let #items: ::std::vec::Vec<_> = #read;
        let #kind = #select_kind;
        #krate::__private::call_many(
            #cache_ref, &#site, #head, #tail, #kind, #krate::__private::Absent::#absent,
            move |#missing| {
                #(#copies)*
                async move {
                    #rebuild
                    #body
                }
            },
        ).await
    }
}
