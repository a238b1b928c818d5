//! How a call's output maps to the value that is stored, and the encoder
//! and decoder resolved once per output type.

use crate::codec::{Codec, CodecError};
use serde::{Serialize, de::DeserializeOwned};
use std::marker::PhantomData;

/// How a call's output maps to the value that is stored.
///
/// Implemented for `Result<T, E>` (only `Ok(T)` is stored) and for any
/// other type (stored as is); `#[cached]` picks one by the return type.
pub trait OutputKind<R> {
    /// The stored part of the output.
    type Value;
    /// The part to store, or `None` when this output must not be cached.
    fn stored(output: &R) -> Option<&Self::Value>;
    /// Rebuilds the output from a stored value.
    fn from_stored(value: Self::Value) -> R;
}

/// `Result<T, E>`: store `T` from `Ok`, never an `Err`.
pub struct ResultOutput<T, E>(pub(crate) PhantomData<fn() -> (T, E)>);
/// Any other output: store it as is (so `None` is cached too).
pub struct PlainOutput<R>(pub(crate) PhantomData<fn() -> R>);

impl<T, E> OutputKind<Result<T, E>> for ResultOutput<T, E> {
    type Value = T;
    fn stored(output: &Result<T, E>) -> Option<&T> {
        output.as_ref().ok()
    }
    fn from_stored(value: T) -> Result<T, E> {
        Ok(value)
    }
}

impl<R> OutputKind<R> for PlainOutput<R> {
    type Value = R;
    fn stored(output: &R) -> Option<&R> {
        Some(output)
    }
    fn from_stored(value: R) -> R {
        value
    }
}

pub(crate) type Encoded = Result<Vec<u8>, CodecError>;

/// How outputs of type `R` are encoded and decoded: the serde bounds,
/// resolved once into function pointers.
pub struct Storage<R> {
    /// `None`: this output is not stored (an `Err`).
    pub(crate) encode: fn(&R, Codec) -> Option<Encoded>,
    /// The last argument bounds the payload: `max_value_bytes` for what
    /// was read from a store.
    pub(crate) decode: fn(&[u8], Codec, usize) -> Result<R, CodecError>,
    /// Whether this output would be stored, without encoding it.
    pub(crate) cacheable: fn(&R) -> bool,
}

impl<R> Clone for Storage<R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Storage<R> {}

impl<R> Storage<R> {
    pub(crate) fn of<K>() -> Self
    where
        K: OutputKind<R>,
        K::Value: Serialize + DeserializeOwned,
    {
        fn encode<R, K>(output: &R, codec: Codec) -> Option<Encoded>
        where
            K: OutputKind<R>,
            K::Value: Serialize,
        {
            K::stored(output).map(|value| codec.encode(value))
        }
        fn decode<R, K>(payload: &[u8], codec: Codec, max_bytes: usize) -> Result<R, CodecError>
        where
            K: OutputKind<R>,
            K::Value: DeserializeOwned,
        {
            codec.decode_within::<K::Value>(payload, max_bytes).map(K::from_stored)
        }
        fn cacheable<R, K: OutputKind<R>>(output: &R) -> bool {
            K::stored(output).is_some()
        }
        Self { encode: encode::<R, K>, decode: decode::<R, K>, cacheable: cacheable::<R, K> }
    }
}

/// How a bulk call's output (`#[cached(batch(..))]`) holds its items'
/// values: a map from item to value (`HashMap`, `BTreeMap`, `Vec<(K, V)>`,
/// anything that collects from and iterates over pairs), optionally in a
/// `Result` whose `Err` is never stored.
pub trait ManyKind<R> {
    /// The map of items to values.
    type Map: IntoIterator<Item = (Self::Item, Self::Value)> + FromIterator<(Self::Item, Self::Value)>;
    /// What each value is cached for: the batch parameter's item type.
    type Item;
    /// What is cached per item.
    type Value;
    /// The output's error, never stored.
    type Error;
    /// The map, or the error.
    fn split(output: R) -> Result<Self::Map, Self::Error>;
    /// Back to the output type.
    fn join(result: Result<Self::Map, Self::Error>) -> R;
}

/// `Result<M, E>`: the map of an `Ok`; an `Err` is returned, never stored.
pub struct ManyResult<M, E>(pub(crate) PhantomData<fn() -> (M, E)>);
/// A bare map.
pub struct ManyPlain<M>(pub(crate) PhantomData<fn() -> M>);

impl<M, E, K, V> ManyKind<Result<M, E>> for ManyResult<M, E>
where
    M: IntoIterator<Item = (K, V)> + FromIterator<(K, V)>,
{
    type Map = M;
    type Item = K;
    type Value = V;
    type Error = E;
    fn split(output: Result<M, E>) -> Result<M, E> {
        output
    }
    fn join(result: Result<M, E>) -> Result<M, E> {
        result
    }
}

impl<M, K, V> ManyKind<M> for ManyPlain<M>
where
    M: IntoIterator<Item = (K, V)> + FromIterator<(K, V)>,
{
    type Map = M;
    type Item = K;
    type Value = V;
    type Error = std::convert::Infallible;
    fn split(output: M) -> Result<M, std::convert::Infallible> {
        Ok(output)
    }
    fn join(result: Result<M, std::convert::Infallible>) -> M {
        match result {
            Ok(map) => map,
            Err(never) => match never {},
        }
    }
}
