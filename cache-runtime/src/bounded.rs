//! A serde `Deserializer` wrapper that bounds what a stored entry can make
//! decoding do, whatever its bytes claim.
//!
//! bincode has no depth limit: an entry of a recursive type nested a
//! million deep recurses a million frames and overflows the stack (an
//! abort, not an error). And it allocates a `String` or byte buffer of the
//! length an entry claims before finding the bytes missing. The wrapper
//! counts nesting and refuses past [`MAX_DEPTH`]; reads owned strings and
//! byte buffers as borrowed slices of the payload, which fail on a length
//! longer than what is left without allocating it; and caps the length
//! hints containers pre-allocate from by the payload's length, since every
//! element takes at least a byte of it.

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use std::fmt;

/// Nesting levels a decoded value may have: options, newtypes, sequences,
/// maps, structs and enum variants each count one. serde_json's limit too,
/// and a few hundred kilobytes of stack in a debug build at most.
pub(crate) const MAX_DEPTH: usize = 128;

/// Wraps `inner`; `budget` is the payload's length.
pub(crate) struct Bounded<D> {
    inner: D,
    /// Nesting levels still allowed below this one.
    depth: usize,
    budget: usize,
}

impl<D> Bounded<D> {
    pub(crate) fn new(inner: D, budget: usize) -> Self {
        Self { inner, depth: MAX_DEPTH, budget }
    }

    /// The depth left for what this level contains, or the error.
    fn descend<E: de::Error>(&self) -> Result<usize, E> {
        self.depth
            .checked_sub(1)
            .ok_or_else(|| E::custom(format_args!("the value nests deeper than {MAX_DEPTH} levels")))
    }
}

/// A wrapper of the same depth and budget around something else.
macro_rules! wrap {
    ($kind:ident, $inner:expr, $depth:expr, $budget:expr) => {
        $kind { inner: $inner, depth: $depth, budget: $budget }
    };
}

macro_rules! scalars {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.inner.$method(visitor)
            }
        )*
    };
}

macro_rules! nested {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                let depth = self.descend()?;
                self.inner.$method(wrap!(BoundedVisitor, visitor, depth, self.budget))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<D> {
    type Error = D::Error;

    scalars!(
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_bytes,
        deserialize_unit,
        deserialize_identifier,
    );

    nested!(deserialize_any, deserialize_option, deserialize_seq, deserialize_map, deserialize_ignored_any);

    /// As a borrowed `str`: the visitor copies exactly the bytes that are
    /// there, rather than the decoder allocating what the length claims.
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_str(visitor)
    }

    /// As borrowed bytes, like [`deserialize_string`](Self::deserialize_string).
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_bytes(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, D::Error> {
        let depth = self.descend()?;
        self.inner.deserialize_newtype_struct(name, wrap!(BoundedVisitor, visitor, depth, self.budget))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, D::Error> {
        let depth = self.descend()?;
        self.inner.deserialize_tuple(len, wrap!(BoundedVisitor, visitor, depth, self.budget))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let depth = self.descend()?;
        self.inner.deserialize_tuple_struct(name, len, wrap!(BoundedVisitor, visitor, depth, self.budget))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let depth = self.descend()?;
        self.inner.deserialize_struct(name, fields, wrap!(BoundedVisitor, visitor, depth, self.budget))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let depth = self.descend()?;
        self.inner.deserialize_enum(name, variants, wrap!(BoundedVisitor, visitor, depth, self.budget))
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// A visitor whose nested deserializers and accessors are wrapped at the
/// depth it was given.
struct BoundedVisitor<V> {
    inner: V,
    depth: usize,
    budget: usize,
}

macro_rules! forward_visits {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
                self.inner.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for BoundedVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visits!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_some(wrap!(Bounded, deserializer, self.depth, self.budget))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_newtype_struct(wrap!(Bounded, deserializer, self.depth, self.budget))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_seq(wrap!(BoundedAccess, seq, self.depth, self.budget))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(wrap!(BoundedAccess, map, self.depth, self.budget))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_enum(wrap!(BoundedAccess, data, self.depth, self.budget))
    }
}

/// A `SeqAccess`, `MapAccess`, `EnumAccess` or `VariantAccess` whose
/// elements are deserialized through [`Bounded`].
struct BoundedAccess<A> {
    inner: A,
    depth: usize,
    budget: usize,
}

/// A seed whose deserializer is wrapped.
struct BoundedSeed<S> {
    inner: S,
    depth: usize,
    budget: usize,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for BoundedSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(wrap!(Bounded, deserializer, self.depth, self.budget))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for BoundedAccess<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(wrap!(BoundedSeed, seed, self.depth, self.budget))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint().map(|n| n.min(self.budget))
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for BoundedAccess<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(wrap!(BoundedSeed, seed, self.depth, self.budget))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(wrap!(BoundedSeed, seed, self.depth, self.budget))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint().map(|n| n.min(self.budget))
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for BoundedAccess<A> {
    type Error = A::Error;
    type Variant = BoundedAccess<A::Variant>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), A::Error> {
        let (depth, budget) = (self.depth, self.budget);
        let (value, variant) = self.inner.variant_seed(wrap!(BoundedSeed, seed, depth, budget))?;
        Ok((value, wrap!(BoundedAccess, variant, depth, budget)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for BoundedAccess<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.newtype_variant_seed(wrap!(BoundedSeed, seed, self.depth, self.budget))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.inner.tuple_variant(len, wrap!(BoundedVisitor, visitor, self.depth, self.budget))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.inner.struct_variant(fields, wrap!(BoundedVisitor, visitor, self.depth, self.budget))
    }
}
