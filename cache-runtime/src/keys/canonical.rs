//! The stable encoding of arguments that keys are hashed from.
//!
//! Keys must be equal in every process, on every platform and in every
//! release, so this encoding is specified here rather than borrowed from a
//! format whose output may change (`Debug`, `std::hash`, a codec's defaults).
//! Every value starts with a tag byte, numbers are little-endian at their
//! declared width, strings and bytes carry their length, and sequences end
//! with [`END`], so the encoding is self-delimiting: two different argument
//! lists never produce the same bytes. Map entries are sorted by their
//! encoded key, so a `HashMap` hashes the same whatever its iteration order.
//!
//! Changing anything in this file changes every key: treat it as a format.

use serde::ser::{self, Serialize};
use std::fmt;

/// Where encoded bytes go: straight into the hasher, or into a buffer while
/// a map entry waits to be sorted.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

mod tag {
    pub const FALSE: u8 = 0x01;
    pub const TRUE: u8 = 0x02;
    pub const I8: u8 = 0x10;
    pub const I16: u8 = 0x11;
    pub const I32: u8 = 0x12;
    pub const I64: u8 = 0x13;
    pub const I128: u8 = 0x14;
    pub const U8: u8 = 0x18;
    pub const U16: u8 = 0x19;
    pub const U32: u8 = 0x1a;
    pub const U64: u8 = 0x1b;
    pub const U128: u8 = 0x1c;
    pub const F32: u8 = 0x20;
    pub const F64: u8 = 0x21;
    pub const CHAR: u8 = 0x28;
    pub const STR: u8 = 0x29;
    pub const BYTES: u8 = 0x2a;
    pub const NONE: u8 = 0x30;
    pub const SOME: u8 = 0x31;
    pub const UNIT: u8 = 0x32;
    pub const UNIT_STRUCT: u8 = 0x33;
    pub const UNIT_VARIANT: u8 = 0x34;
    pub const NEWTYPE_STRUCT: u8 = 0x35;
    pub const NEWTYPE_VARIANT: u8 = 0x36;
    pub const SEQ: u8 = 0x40;
    pub const TUPLE: u8 = 0x41;
    pub const TUPLE_STRUCT: u8 = 0x42;
    pub const TUPLE_VARIANT: u8 = 0x43;
    pub const MAP: u8 = 0x44;
    pub const STRUCT: u8 = 0x45;
    pub const STRUCT_VARIANT: u8 = 0x46;
    pub const SKIPPED_FIELD: u8 = 0x47;
    pub const END: u8 = 0x4f;
}

/// Encodes `value` canonically into `sink`.
pub(crate) fn encode<S: Sink, T: Serialize + ?Sized>(sink: &mut S, value: &T) -> Result<(), Unencodable> {
    value.serialize(Encoder { sink })
}

/// A value whose `Serialize` impl reported an error (serde's custom errors).
#[derive(Debug, Clone)]
pub struct Unencodable(String);

impl fmt::Display for Unencodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "argument could not be encoded for the key: {}", self.0)
    }
}

impl std::error::Error for Unencodable {}

impl ser::Error for Unencodable {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Unencodable(msg.to_string())
    }
}

struct Encoder<'a, S: Sink> {
    sink: &'a mut S,
}

impl<S: Sink> Encoder<'_, S> {
    fn tagged(self, tag: u8, bytes: &[u8]) -> Result<(), Unencodable> {
        self.sink.put(&[tag]);
        self.sink.put(bytes);
        Ok(())
    }

    fn sized(self, tag: u8, bytes: &[u8]) -> Result<(), Unencodable> {
        self.sink.put(&[tag]);
        self.sink.put(&(bytes.len() as u64).to_le_bytes());
        self.sink.put(bytes);
        Ok(())
    }

    fn name(&mut self, name: &str) {
        self.sink.put(&(name.len() as u64).to_le_bytes());
        self.sink.put(name.as_bytes());
    }

    fn variant(&mut self, tag: u8, index: u32, name: &str) {
        self.sink.put(&[tag]);
        self.sink.put(&index.to_le_bytes());
        self.name(name);
    }
}

/// Serializes the elements of a sequence, tuple or struct in order.
pub(crate) struct Compound<'a, S: Sink> {
    sink: &'a mut S,
}

impl<S: Sink> Compound<'_, S> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unencodable> {
        value.serialize(Encoder { sink: &mut *self.sink })
    }

    fn end(self) -> Result<(), Unencodable> {
        self.sink.put(&[tag::END]);
        Ok(())
    }
}

/// Buffers map entries so they can be written in sorted order.
pub(crate) struct SortedMap<'a, S: Sink> {
    sink: &'a mut S,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    pending_key: Option<Vec<u8>>,
}

impl<'a, S: Sink> ser::Serializer for Encoder<'a, S> {
    type Ok = ();
    type Error = Unencodable;
    type SerializeSeq = Compound<'a, S>;
    type SerializeTuple = Compound<'a, S>;
    type SerializeTupleStruct = Compound<'a, S>;
    type SerializeTupleVariant = Compound<'a, S>;
    type SerializeMap = SortedMap<'a, S>;
    type SerializeStruct = Compound<'a, S>;
    type SerializeStructVariant = Compound<'a, S>;

    fn serialize_bool(self, v: bool) -> Result<(), Unencodable> {
        self.tagged(if v { tag::TRUE } else { tag::FALSE }, &[])
    }
    fn serialize_i8(self, v: i8) -> Result<(), Unencodable> {
        self.tagged(tag::I8, &v.to_le_bytes())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Unencodable> {
        self.tagged(tag::I16, &v.to_le_bytes())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Unencodable> {
        self.tagged(tag::I32, &v.to_le_bytes())
    }
    fn serialize_i64(self, v: i64) -> Result<(), Unencodable> {
        self.tagged(tag::I64, &v.to_le_bytes())
    }
    fn serialize_i128(self, v: i128) -> Result<(), Unencodable> {
        self.tagged(tag::I128, &v.to_le_bytes())
    }
    fn serialize_u8(self, v: u8) -> Result<(), Unencodable> {
        self.tagged(tag::U8, &v.to_le_bytes())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Unencodable> {
        self.tagged(tag::U16, &v.to_le_bytes())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Unencodable> {
        self.tagged(tag::U32, &v.to_le_bytes())
    }
    fn serialize_u64(self, v: u64) -> Result<(), Unencodable> {
        self.tagged(tag::U64, &v.to_le_bytes())
    }
    fn serialize_u128(self, v: u128) -> Result<(), Unencodable> {
        self.tagged(tag::U128, &v.to_le_bytes())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Unencodable> {
        self.tagged(tag::F32, &v.to_bits().to_le_bytes())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Unencodable> {
        self.tagged(tag::F64, &v.to_bits().to_le_bytes())
    }
    fn serialize_char(self, v: char) -> Result<(), Unencodable> {
        self.tagged(tag::CHAR, &u32::from(v).to_le_bytes())
    }
    fn serialize_str(self, v: &str) -> Result<(), Unencodable> {
        self.sized(tag::STR, v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Unencodable> {
        self.sized(tag::BYTES, v)
    }
    fn serialize_none(self) -> Result<(), Unencodable> {
        self.tagged(tag::NONE, &[])
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Unencodable> {
        self.sink.put(&[tag::SOME]);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Unencodable> {
        self.tagged(tag::UNIT, &[])
    }
    fn serialize_unit_struct(mut self, name: &'static str) -> Result<(), Unencodable> {
        self.sink.put(&[tag::UNIT_STRUCT]);
        self.name(name);
        Ok(())
    }
    fn serialize_unit_variant(mut self, _: &'static str, index: u32, variant: &'static str) -> Result<(), Unencodable> {
        self.variant(tag::UNIT_VARIANT, index, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), Unencodable> {
        self.sink.put(&[tag::NEWTYPE_STRUCT]);
        self.name(name);
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Unencodable> {
        self.variant(tag::NEWTYPE_VARIANT, index, variant);
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a, S>, Unencodable> {
        self.sink.put(&[tag::SEQ]);
        Ok(Compound { sink: self.sink })
    }
    fn serialize_tuple(self, _: usize) -> Result<Compound<'a, S>, Unencodable> {
        self.sink.put(&[tag::TUPLE]);
        Ok(Compound { sink: self.sink })
    }
    fn serialize_tuple_struct(mut self, name: &'static str, _: usize) -> Result<Compound<'a, S>, Unencodable> {
        self.sink.put(&[tag::TUPLE_STRUCT]);
        self.name(name);
        Ok(Compound { sink: self.sink })
    }
    fn serialize_tuple_variant(
        mut self,
        _: &'static str,
        index: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a, S>, Unencodable> {
        self.variant(tag::TUPLE_VARIANT, index, variant);
        Ok(Compound { sink: self.sink })
    }
    fn serialize_map(self, len: Option<usize>) -> Result<SortedMap<'a, S>, Unencodable> {
        Ok(SortedMap { sink: self.sink, entries: Vec::with_capacity(len.unwrap_or(0)), pending_key: None })
    }
    fn serialize_struct(mut self, name: &'static str, _: usize) -> Result<Compound<'a, S>, Unencodable> {
        self.sink.put(&[tag::STRUCT]);
        self.name(name);
        Ok(Compound { sink: self.sink })
    }
    fn serialize_struct_variant(
        mut self,
        _: &'static str,
        index: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Compound<'a, S>, Unencodable> {
        self.variant(tag::STRUCT_VARIANT, index, variant);
        Ok(Compound { sink: self.sink })
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

macro_rules! compound_impl {
    ($($trait:ident :: $method:ident),* $(,)?) => {$(
        impl<S: Sink> ser::$trait for Compound<'_, S> {
            type Ok = ();
            type Error = Unencodable;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unencodable> {
                self.element(value)
            }
            fn end(self) -> Result<(), Unencodable> {
                Compound::end(self)
            }
        }
    )*};
}

compound_impl!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

macro_rules! named_fields_impl {
    ($($trait:ident),*) => {$(
        impl<S: Sink> ser::$trait for Compound<'_, S> {
            type Ok = ();
            type Error = Unencodable;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Unencodable> {
                Encoder { sink: &mut *self.sink }.name(key);
                self.element(value)
            }
            fn skip_field(&mut self, key: &'static str) -> Result<(), Unencodable> {
                // A skipped field must still differ from a present one.
                self.sink.put(&[tag::SKIPPED_FIELD]);
                Encoder { sink: &mut *self.sink }.name(key);
                Ok(())
            }
            fn end(self) -> Result<(), Unencodable> {
                Compound::end(self)
            }
        }
    )*};
}

named_fields_impl!(SerializeStruct, SerializeStructVariant);

impl<S: Sink> ser::SerializeMap for SortedMap<'_, S> {
    type Ok = ();
    type Error = Unencodable;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Unencodable> {
        let mut buf = Vec::new();
        encode(&mut buf, key)?;
        self.pending_key = Some(buf);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Unencodable> {
        let key =
            self.pending_key.take().ok_or_else(|| <Unencodable as ser::Error>::custom("map value without a key"))?;
        let mut buf = Vec::new();
        encode(&mut buf, value)?;
        self.entries.push((key, buf));
        Ok(())
    }

    fn end(mut self) -> Result<(), Unencodable> {
        self.entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.sink.put(&[tag::MAP]);
        for (key, value) in &self.entries {
            self.sink.put(key);
            self.sink.put(value);
        }
        self.sink.put(&[tag::END]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    fn bytes<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, value).unwrap();
        out
    }

    #[test]
    fn encoding_is_pinned() {
        // The format is a compatibility promise: these bytes must never change.
        assert_eq!(bytes(&7u32), [0x1a, 7, 0, 0, 0]);
        assert_eq!(bytes("ab"), [0x29, 2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
        assert_eq!(bytes(&(1u8, Some(true))), [0x41, 0x18, 1, 0x31, 0x02, 0x4f]);
        assert_eq!(bytes(&vec![-1i16]), [0x40, 0x11, 0xff, 0xff, 0x4f]);
    }

    #[test]
    fn maps_hash_the_same_in_any_order() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..64u32 {
            a.insert(i, i.to_string());
        }
        for i in (0..64u32).rev() {
            b.insert(i, i.to_string());
        }
        let sorted: BTreeMap<_, _> = a.iter().map(|(k, v)| (*k, v.clone())).collect();
        assert_eq!(bytes(&a), bytes(&b));
        assert_eq!(bytes(&a), bytes(&sorted));
    }

    #[test]
    fn boundaries_are_unambiguous() {
        assert_ne!(bytes(&("ab", "c")), bytes(&("a", "bc")));
        assert_ne!(bytes(&(vec![1u8], vec![2u8])), bytes(&(vec![1u8, 2], Vec::<u8>::new())));
        assert_ne!(bytes(&None::<u8>), bytes(&()));
        assert_ne!(bytes(&1u32), bytes(&1u64));
    }
}
