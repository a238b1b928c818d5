//! The function `#[cached]` is applied to, read as little as the expansion
//! needs.
//!
//! The signature is parsed; the body is kept as the tokens it was written
//! with. A body that does not parse therefore still expands to the function
//! with its signature, and the compiler reports the syntax error itself,
//! once, at its place: callers keep resolving and IDEs keep completing (as
//! tokio-macros does). Inner attributes (`#![allow(..)]`) are kept apart so
//! that they go back inside the body, where they were written.

use proc_macro2::TokenStream;
use quote::{ToTokens, TokenStreamExt};
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Signature, Visibility, braced, token};

pub(crate) struct CachedFn {
    pub outer_attrs: Vec<Attribute>,
    pub vis: Visibility,
    pub sig: Signature,
    pub brace_token: token::Brace,
    pub inner_attrs: Vec<Attribute>,
    /// The statements after the inner attributes, unparsed.
    pub body: TokenStream,
}

impl Parse for CachedFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let outer_attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig = input.parse()?;
        let content;
        let brace_token = braced!(content in input);
        let inner_attrs = content.call(Attribute::parse_inner)?;
        let body = content.parse()?;
        Ok(CachedFn { outer_attrs, vis, sig, brace_token, inner_attrs, body })
    }
}

/// The function as it was written.
impl ToTokens for CachedFn {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        tokens.append_all(&self.outer_attrs);
        self.vis.to_tokens(tokens);
        self.sig.to_tokens(tokens);
        self.brace_token.surround(tokens, |tokens| {
            tokens.append_all(&self.inner_attrs);
            self.body.to_tokens(tokens);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_does_not_parse_keeps_the_signature() {
        let item: CachedFn = syn::parse_str("pub async fn f(x: u32) -> u32 { let = ; x }").expect("signature parses");
        assert_eq!(item.sig.ident, "f");
        assert_eq!(item.body.to_string(), "let = ; x");
    }

    #[test]
    fn inner_attributes_are_kept_apart_and_written_back_inside() {
        let item: CachedFn =
            syn::parse_str("#[doc = \"d\"] async fn f() { #![allow(unused_variables)] let a = 1; }").expect("parses");
        assert_eq!(item.outer_attrs.len(), 1);
        assert_eq!(item.inner_attrs.len(), 1);
        let written = item.to_token_stream().to_string();
        assert!(written.ends_with("{ # ! [allow (unused_variables)] let a = 1 ; }"), "{written}");
    }
}
