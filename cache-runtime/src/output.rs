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

/// A map from a bulk call's items to their values: `HashMap`,
/// `BTreeMap`, or `Vec<(item, value)>` (which keeps the caller's order).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a map from items to values",
    label = "a `batch(..)` function returns a `HashMap`, `BTreeMap` or `Vec<(item, value)>` of its items, optionally \
             in a `Result`"
)]
pub trait ItemMap {
    /// The batch parameter's item type.
    type Item;
    /// What is cached per item.
    type Value;
    /// The pairs, in the map's order.
    fn into_pairs(self) -> Vec<(Self::Item, Self::Value)>;
    /// The map of these pairs.
    fn from_pairs(pairs: Vec<(Self::Item, Self::Value)>) -> Self;
}

impl<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher + Default> ItemMap for std::collections::HashMap<K, V, S> {
    type Item = K;
    type Value = V;
    fn into_pairs(self) -> Vec<(K, V)> {
        self.into_iter().collect()
    }
    fn from_pairs(pairs: Vec<(K, V)>) -> Self {
        pairs.into_iter().collect()
    }
}

impl<K: Ord, V> ItemMap for std::collections::BTreeMap<K, V> {
    type Item = K;
    type Value = V;
    fn into_pairs(self) -> Vec<(K, V)> {
        self.into_iter().collect()
    }
    fn from_pairs(pairs: Vec<(K, V)>) -> Self {
        pairs.into_iter().collect()
    }
}

impl<K, V> ItemMap for Vec<(K, V)> {
    type Item = K;
    type Value = V;
    fn into_pairs(self) -> Vec<(K, V)> {
        self
    }
    fn from_pairs(pairs: Vec<(K, V)>) -> Self {
        pairs
    }
}

/// How a bulk call's output (`#[cached(batch(..))]`) holds its items'
/// values: an [`ItemMap`], optionally in a `Result` whose `Err` is never
/// stored.
pub trait ManyKind<R> {
    /// The batch parameter's item type.
    type Item;
    /// What is cached per item.
    type Value;
    /// The pairs of the output, or the output itself when it is an error.
    fn split(output: R) -> Split<Self::Item, Self::Value, R>;
    /// The output of these pairs.
    fn join(pairs: Vec<(Self::Item, Self::Value)>) -> R;
}

/// A bulk call's output taken apart: its pairs, or the output itself when
/// it is an error (returned as it is, never stored).
pub type Split<K, V, R> = Result<Vec<(K, V)>, R>;

/// `Result<M, E>`: the map of an `Ok`; an `Err` is returned, never stored.
pub struct ManyResult<M, E>(pub(crate) PhantomData<fn() -> (M, E)>);
/// A bare map.
pub struct ManyPlain<M>(pub(crate) PhantomData<fn() -> M>);

impl<M: ItemMap, E> ManyKind<Result<M, E>> for ManyResult<M, E> {
    type Item = M::Item;
    type Value = M::Value;
    fn split(output: Result<M, E>) -> Split<M::Item, M::Value, Result<M, E>> {
        match output {
            Ok(map) => Ok(map.into_pairs()),
            Err(e) => Err(Err(e)),
        }
    }
    fn join(pairs: Vec<(M::Item, M::Value)>) -> Result<M, E> {
        Ok(M::from_pairs(pairs))
    }
}

impl<M: ItemMap> ManyKind<M> for ManyPlain<M> {
    type Item = M::Item;
    type Value = M::Value;
    fn split(output: M) -> Split<M::Item, M::Value, M> {
        Ok(output.into_pairs())
    }
    fn join(pairs: Vec<(M::Item, M::Value)>) -> M {
        M::from_pairs(pairs)
    }
}
