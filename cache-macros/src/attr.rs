//! Parsing and validating `#[cached(...)]`'s arguments.
//!
//! Every mistake becomes a `syn::Error` spanned on the offending token, and
//! all of them are reported together.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, ExprUnary, Ident, Lit, LitStr, Token, UnOp};

const ARGS: &str = "ttl, prefix, jitter, skip, key, codec, compress, cache, version, tags, lock, lock_timeout, local, \
                    local_ttl, refresh_ahead, stale_if_error, batch, absent, crate";
pub(crate) const MAX_JITTER: f64 = 0.5;

/// The validated arguments.
#[derive(Default)]
pub(crate) struct CachedArgs {
    pub ttl_secs: Option<u64>,
    pub prefix: Option<LitStr>,
    pub jitter: Option<f64>,
    pub skip: Vec<Ident>,
    pub key: Option<Expr>,
    pub codec: Option<Codec>,
    /// The algorithm, and where it was named (a `zstd` the runtime was
    /// built without is an error there).
    pub compress: Option<(Compress, Span)>,
    pub cache: Option<Expr>,
    pub version: Option<u32>,
    pub tags: Vec<LitStr>,
    pub lock: Option<bool>,
    pub lock_timeout_ms: Option<u64>,
    pub local: Option<bool>,
    pub local_ttl_ms: Option<u64>,
    pub refresh_ahead: Option<f64>,
    /// Where `refresh_ahead` was written, for errors about the arguments it
    /// cannot take.
    pub refresh_ahead_span: Option<Span>,
    pub stale_if_error_secs: Option<u64>,
    /// Where `skip` was written, for errors about it.
    pub skip_span: Option<Span>,
    /// `crate = "path"`: where the runtime is, when it is renamed or
    /// re-exported.
    pub crate_path: Option<syn::Path>,
    /// `batch(param)`: the parameter holding the items of a bulk call.
    pub batch: Option<Ident>,
    /// `absent = "cache" | "skip"`: whether an item the body did not
    /// return is cached as absent; `true` for "skip".
    pub skip_absent: Option<bool>,
    /// Where `absent` was written.
    pub absent_span: Option<Span>,
}

#[derive(Clone, Copy)]
pub(crate) enum Codec {
    Bincode,
    Json,
}

#[derive(Clone, Copy)]
pub(crate) enum Compress {
    None,
    Lz4,
    Zstd,
}

/// One `name = value` or `name(list)` before validation.
struct RawArg {
    name: Ident,
    value: RawValue,
}

enum RawValue {
    Assign(Expr),
    List(Punctuated<Expr, Token![,]>),
    Bare,
}

impl Parse for RawArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name: Ident = input.call(syn::ext::IdentExt::parse_any)?;
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            RawValue::Assign(input.parse()?)
        } else if input.peek(syn::token::Paren) {
            let content;
            syn::parenthesized!(content in input);
            RawValue::List(content.parse_terminated(Expr::parse, Token![,])?)
        } else {
            RawValue::Bare
        };
        Ok(RawArg { name, value })
    }
}

/// Collects errors so that one run of the compiler reports all of them.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(first) => first.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    pub(crate) fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

impl Parse for CachedArgs {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let raw = Punctuated::<RawArg, Token![,]>::parse_terminated(input)?;
        let mut args = CachedArgs::default();
        let mut errors = Errors::default();
        let mut seen: Vec<String> = Vec::new();
        let mut local_ttl_span = None;
        for arg in raw {
            let name = arg.name.to_string();
            if name == "local_ttl" {
                local_ttl_span = Some(arg.name.span());
            }
            if seen.contains(&name) {
                errors.at(arg.name.span(), format!("duplicate `{name}` argument"));
                continue;
            }
            seen.push(name.clone());
            if let Err(e) = args.accept(&name, arg) {
                errors.push(e);
            }
        }
        if let (Some(false), Some(span)) = (args.local, local_ttl_span) {
            errors.at(span, "`local_ttl` needs the local tier: remove `local = false`");
        }
        if let (Some(local_ttl), Some(ttl), Some(span)) = (args.local_ttl_ms, args.ttl_secs, local_ttl_span)
            && local_ttl > ttl * 1000
        {
            errors.at(span, "`local_ttl` is longer than `ttl`: an entry leaves the local tier when it expires");
        }
        if let Some(batch) = &args.batch {
            let why = "cannot be combined with `batch`";
            if let Some(key) = &args.key {
                errors.push(syn::Error::new_spanned(
                    key,
                    format!("`key` {why}: each item's key is the other arguments plus the item"),
                ));
            }
            if let Some(span) = args.refresh_ahead_span {
                errors.at(span, format!("`refresh_ahead` {why} (not supported for bulk calls yet)"));
            }
            if args.stale_if_error_secs.is_some() {
                errors.at(batch.span(), format!("`stale_if_error` {why} (not supported for bulk calls yet)"));
            }
        } else if let Some(span) = args.absent_span {
            errors.at(span, "`absent` only applies to `batch(...)` functions");
        }
        if let (Some(key), Some(span)) = (&args.key, args.skip_span) {
            let mut e =
                syn::Error::new(span, "`skip` has no effect together with `key`: `key` alone decides what is hashed");
            e.combine(syn::Error::new_spanned(key, "`key` given here"));
            errors.push(e);
        }
        errors.finish()?;
        Ok(args)
    }
}

impl CachedArgs {
    /// The runtime's path, the root of every path the expansion names.
    /// The default is spanned at `span`, so a call the expansion makes at
    /// the user's tokens (the return type) is reported there, not at the
    /// attribute; a written path keeps its own span.
    pub(crate) fn crate_path(&self, span: Span) -> TokenStream {
        match &self.crate_path {
            Some(path) => path.to_token_stream(),
            None => quote_spanned! {span=> ::cache_runtime },
        }
    }

    fn accept(&mut self, name: &str, arg: RawArg) -> syn::Result<()> {
        let span = arg.name.span();
        match (name, arg.value) {
            ("ttl", RawValue::Assign(expr)) => self.ttl_secs = Some(seconds(&expr, "ttl")?),
            ("version", RawValue::Assign(expr)) => {
                self.version = Some(
                    u32::try_from(non_negative_int(&expr, "version")?)
                        .map_err(|_| syn::Error::new_spanned(&expr, "`version` must fit in a u32"))?,
                )
            }
            ("jitter", RawValue::Assign(expr)) => self.jitter = Some(jitter(&expr)?),
            ("prefix", RawValue::Assign(expr)) => self.prefix = Some(namespace(&expr, "prefix")?),
            ("codec", RawValue::Assign(expr)) => {
                let lit = string(&expr, "codec")?;
                self.codec = Some(match lit.value().as_str() {
                    "bincode" => Codec::Bincode,
                    "json" => Codec::Json,
                    other => {
                        return Err(syn::Error::new_spanned(
                            lit,
                            format!("unknown codec `{other}`: expected \"bincode\" or \"json\""),
                        ));
                    }
                })
            }
            ("compress", RawValue::Assign(expr)) => {
                let lit = string(&expr, "compress")?;
                let compress = match lit.value().as_str() {
                    "none" => Compress::None,
                    "lz4" => Compress::Lz4,
                    "zstd" => Compress::Zstd,
                    other => {
                        return Err(syn::Error::new_spanned(
                            lit,
                            format!("unknown compression `{other}`: expected \"lz4\", \"zstd\" or \"none\""),
                        ));
                    }
                };
                self.compress = Some((compress, lit.span()));
            }
            ("key", RawValue::Assign(expr)) => self.key = Some(expr),
            ("lock", RawValue::Assign(expr)) => match &expr {
                Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => self.lock = Some(b.value),
                _ => return Err(syn::Error::new_spanned(expr, "`lock` must be `true` or `false`")),
            },
            ("lock_timeout", RawValue::Assign(expr)) => {
                self.lock_timeout_ms = Some(seconds_as_millis(&expr, "lock_timeout")?)
            }
            ("local", RawValue::Assign(expr)) => match &expr {
                Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => self.local = Some(b.value),
                _ => return Err(syn::Error::new_spanned(expr, "`local` must be `true` or `false`")),
            },
            ("local_ttl", RawValue::Assign(expr)) => self.local_ttl_ms = Some(seconds_as_millis(&expr, "local_ttl")?),
            ("refresh_ahead", RawValue::Assign(expr)) => {
                self.refresh_ahead = Some(refresh_ahead(&expr)?);
                self.refresh_ahead_span = Some(span);
            }
            ("stale_if_error", RawValue::Assign(expr)) => {
                self.stale_if_error_secs = Some(seconds(&expr, "stale_if_error")?)
            }
            ("cache", RawValue::Assign(expr)) => self.cache = Some(expr),
            ("crate", RawValue::Assign(expr)) => self.crate_path = Some(crate_path(&expr)?),
            ("absent", RawValue::Assign(expr)) => {
                let lit = string(&expr, "absent")?;
                self.absent_span = Some(span);
                self.skip_absent = Some(match lit.value().as_str() {
                    "cache" => false,
                    "skip" => true,
                    other => {
                        return Err(syn::Error::new_spanned(
                            lit,
                            format!("unknown `absent` choice `{other}`: expected \"cache\" or \"skip\""),
                        ));
                    }
                });
            }
            ("batch", RawValue::List(list)) => {
                let mut names = list.iter();
                match (names.next().map(parameter_name), names.next()) {
                    (Some(Some(ident)), None) => self.batch = Some(ident),
                    (Some(None), _) => {
                        return Err(syn::Error::new_spanned(&list[0], "expected the name of the items' parameter"));
                    }
                    (None, _) => return Err(syn::Error::new(span, "`batch` names one parameter: `batch(ids)`")),
                    (_, Some(extra)) => {
                        return Err(syn::Error::new_spanned(extra, "`batch` names one parameter: `batch(ids)`"));
                    }
                }
            }
            ("skip", RawValue::List(list)) => {
                self.skip_span = Some(span);
                let mut errors = Errors::default();
                for expr in list {
                    match parameter_name(&expr) {
                        Some(ident) => self.skip.push(ident),
                        None => errors.at(syn::spanned::Spanned::span(&expr), "expected a parameter name"),
                    }
                }
                errors.finish()?;
            }
            ("tags", RawValue::List(list)) => {
                let mut errors = Errors::default();
                for expr in list {
                    match namespace(&expr, "tag") {
                        Ok(tag) if self.tags.iter().any(|t| t.value() == tag.value()) => {
                            errors.at(tag.span(), format!("duplicate tag \"{}\"", tag.value()))
                        }
                        Ok(tag) => self.tags.push(tag),
                        Err(e) => errors.push(e),
                    }
                }
                errors.finish()?;
            }
            (
                "ttl" | "version" | "jitter" | "prefix" | "codec" | "compress" | "key" | "cache" | "lock"
                | "lock_timeout" | "local" | "local_ttl" | "refresh_ahead" | "stale_if_error" | "crate" | "absent",
                _,
            ) => {
                return Err(syn::Error::new(span, format!("expected `{name} = ...`")));
            }
            ("skip" | "tags" | "batch", _) => return Err(syn::Error::new(span, format!("expected `{name}(...)`"))),
            _ => return Err(syn::Error::new(span, format!("unknown argument `{name}`; expected one of: {ARGS}"))),
        }
        Ok(())
    }
}

fn parameter_name(expr: &Expr) -> Option<Ident> {
    match expr {
        Expr::Path(p) if p.attrs.is_empty() && p.qself.is_none() => p.path.get_ident().cloned(),
        _ => None,
    }
}

fn int_literal(expr: &Expr) -> Option<(&syn::LitInt, bool)> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Int(int), .. }) => Some((int, false)),
        Expr::Unary(ExprUnary { op: UnOp::Neg(_), expr, .. }) => match &**expr {
            Expr::Lit(ExprLit { lit: Lit::Int(int), .. }) => Some((int, true)),
            _ => None,
        },
        _ => None,
    }
}

fn non_negative_int(expr: &Expr, name: &str) -> syn::Result<u64> {
    match int_literal(expr) {
        Some((int, false)) => int.base10_parse(),
        Some((_, true)) => Err(syn::Error::new_spanned(expr, format!("`{name}` must not be negative"))),
        None => Err(syn::Error::new_spanned(expr, format!("`{name}` must be an integer literal"))),
    }
}

/// Ten years, the longest TTL or stale window the runtime accepts: Redis
/// refuses expiries past its clock's range, and longer ones overflow
/// millisecond arithmetic.
const MAX_SECONDS: u64 = 10 * 365 * 24 * 60 * 60;

/// A number of seconds from 1 to [`MAX_SECONDS`].
fn seconds(expr: &Expr, name: &str) -> syn::Result<u64> {
    let value = positive_int(expr, name, "seconds")?;
    if value > MAX_SECONDS {
        return Err(syn::Error::new_spanned(
            expr,
            format!("`{name}` must be at most {MAX_SECONDS} seconds (ten years)"),
        ));
    }
    Ok(value)
}

fn positive_int(expr: &Expr, name: &str, unit: &str) -> syn::Result<u64> {
    let value = match int_literal(expr) {
        Some((_, true)) => 0,
        Some((int, false)) => int.base10_parse()?,
        None => return Err(syn::Error::new_spanned(expr, format!("`{name}` must be an integer literal of {unit}"))),
    };
    if value == 0 {
        return Err(syn::Error::new_spanned(expr, format!("`{name}` must be at least 1 ({unit})")));
    }
    Ok(value)
}

/// A positive number of seconds, integer or fractional, in milliseconds.
fn seconds_as_millis(expr: &Expr, name: &str) -> syn::Result<u64> {
    let seconds = match expr {
        Expr::Lit(ExprLit { lit: Lit::Float(f), .. }) => f.base10_parse::<f64>()?,
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i.base10_parse::<f64>()?,
        _ => {
            return Err(syn::Error::new_spanned(
                expr,
                format!("`{name}` must be a number of seconds, such as 2 or 0.5"),
            ));
        }
    };
    let millis = (seconds * 1000.0).round();
    if !(1.0..=86_400_000.0).contains(&millis) {
        return Err(syn::Error::new_spanned(expr, format!("`{name}` must be between 0.001 and 86400 seconds")));
    }
    Ok(millis as u64)
}

/// The share of the TTL after which a hit renews the entry: in (0, 1).
fn refresh_ahead(expr: &Expr) -> syn::Result<f64> {
    let value = match expr {
        Expr::Lit(ExprLit { lit: Lit::Float(f), .. }) => f.base10_parse::<f64>()?,
        _ => return Err(syn::Error::new_spanned(expr, "`refresh_ahead` must be a share of the TTL, such as 0.8")),
    };
    if !(value > 0.0 && value < 1.0) {
        return Err(syn::Error::new_spanned(expr, "`refresh_ahead` must be between 0 and 1, such as 0.8"));
    }
    Ok(value)
}

fn jitter(expr: &Expr) -> syn::Result<f64> {
    let (value, negative) = match expr {
        Expr::Lit(ExprLit { lit: Lit::Float(f), .. }) => (f.base10_parse::<f64>()?, false),
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => (i.base10_parse::<f64>()?, false),
        Expr::Unary(ExprUnary { op: UnOp::Neg(_), .. }) => (0.0, true),
        _ => return Err(syn::Error::new_spanned(expr, "`jitter` must be a number literal such as 0.1")),
    };
    if negative || !(0.0..=MAX_JITTER).contains(&value) {
        return Err(syn::Error::new_spanned(expr, format!("`jitter` must be between 0 and {MAX_JITTER}")));
    }
    Ok(value)
}

/// `crate = "my_reexport::cache_runtime"`, as tokio and serde spell it; a
/// bare path is taken too. Its tokens keep the literal's span, so a path
/// that does not resolve is reported there.
fn crate_path(expr: &Expr) -> syn::Result<syn::Path> {
    const EXAMPLE: &str = "such as `crate = \"my_reexport::cache_runtime\"`";
    let path = match expr {
        Expr::Lit(ExprLit { lit: Lit::Str(lit), .. }) => lit.parse::<syn::Path>().map_err(|_| {
            syn::Error::new_spanned(lit, format!("`crate` must be the path of `cache_runtime`, {EXAMPLE}"))
        })?,
        Expr::Path(p) if p.attrs.is_empty() && p.qself.is_none() => p.path.clone(),
        _ => return Err(syn::Error::new_spanned(expr, format!("`crate` must be a string literal path, {EXAMPLE}"))),
    };
    if let Some(segment) = path.segments.iter().find(|s| !s.arguments.is_none()) {
        return Err(syn::Error::new_spanned(
            expr,
            format!("`crate` names a crate or module: `{}` cannot take generic arguments", segment.ident),
        ));
    }
    Ok(path)
}

fn string(expr: &Expr, name: &str) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Ok(s.clone()),
        _ => Err(syn::Error::new_spanned(expr, format!("`{name}` must be a string literal"))),
    }
}

/// A prefix or tag: non-empty, and nothing that would make keys ambiguous
/// or hard to type in `redis-cli`.
fn namespace(expr: &Expr, name: &str) -> syn::Result<LitStr> {
    let lit = string(expr, name)?;
    let value = lit.value();
    if value.is_empty() {
        return Err(syn::Error::new_spanned(&lit, format!("a {name} must not be empty")));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '*' | '?' | '[' | ']' | '#'))
    {
        return Err(syn::Error::new_spanned(
            &lit,
            format!("a {name} must not contain {c:?}: use letters, digits, `_`, `-`, `.` or `:`"),
        ));
    }
    Ok(lit)
}
