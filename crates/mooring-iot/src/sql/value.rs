//! The values IoT SQL computes with, and AWS's implicit conversions between them.
//!
//! AWS IoT SQL has Int, Decimal, Boolean, String, Array, Object, Null and Undefined; a
//! non-JSON payload adds raw bytes, which only `*` can denote. Int is a 64-bit integer here
//! (AWS keeps up to 34 digits) and Decimal a double (AWS keeps 34 significant digits); an
//! Int operation that overflows continues in Decimal. Objects keep their keys in insertion
//! order, so `SELECT *` republishes a payload with its keys as the device sent them.
//! The `to_*` conversions implement the table of the SQL reference's "Conversions" page:
//! each answers `None` where AWS's answer is Undefined.

use std::fmt::Write as _;

use bytes::Bytes;
use indexmap::IndexMap;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

pub type Object = IndexMap<String, Value>;

/// One IoT SQL value.
#[derive(Debug, Clone, Default)]
pub enum Value {
    #[default]
    Undefined,
    Null,
    Bool(bool),
    Int(i64),
    Decimal(f64),
    String(String),
    Array(Vec<Value>),
    Object(Object),
    /// The raw bytes of a payload that is not JSON (what `*` denotes for such payloads).
    Binary(Bytes),
}

/// A number as arithmetic sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Decimal(f64),
}

impl Number {
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Decimal(d) => d,
        }
    }

    pub fn into_value(self) -> Value {
        match self {
            Number::Int(i) => Value::Int(i),
            Number::Decimal(d) => Value::decimal(d),
        }
    }
}

impl PartialEq for Value {
    /// Structural equality as IoT SQL's `=` sees it, except that Undefined equals Undefined
    /// (the operator handles Undefined before comparing) and Int 1 equals Decimal 1.0.
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Undefined, Value::Undefined) | (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Int(a), Value::Decimal(b)) | (Value::Decimal(b), Value::Int(a)) => {
                (*a as f64) == *b
            }
            (Value::Decimal(a), Value::Decimal(b)) => a == b,
            (Value::String(a), Value::String(b)) => a == b,
            (Value::Array(a), Value::Array(b)) => a == b,
            (Value::Object(a), Value::Object(b)) => {
                a.len() == b.len() && a.iter().all(|(k, v)| b.get(k) == Some(v))
            }
            (Value::Binary(a), Value::Binary(b)) => a == b,
            _ => false,
        }
    }
}

impl Value {
    pub fn string(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// A Decimal, or Undefined when it is not finite (NaN and infinities have no JSON form
    /// and AWS answers Undefined for imaginary or overflowing results).
    pub fn decimal(d: f64) -> Value {
        if d.is_finite() {
            Value::Decimal(d)
        } else {
            Value::Undefined
        }
    }

    pub fn is_undefined(&self) -> bool {
        matches!(self, Value::Undefined)
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Undefined => "Undefined",
            Value::Null => "Null",
            Value::Bool(_) => "Boolean",
            Value::Int(_) => "Int",
            Value::Decimal(_) => "Decimal",
            Value::String(_) => "String",
            Value::Array(_) => "Array",
            Value::Object(_) => "Object",
            Value::Binary(_) => "Binary",
        }
    }

    /// The number this value converts to, when it does: Int and Decimal as they are, and
    /// Strings matching `^-?\d+(\.\d+)?((?i)E-?\d+)?$`.
    pub fn to_number(&self) -> Option<Number> {
        match self {
            Value::Int(i) => Some(Number::Int(*i)),
            Value::Decimal(d) => Some(Number::Decimal(*d)),
            Value::String(s) => parse_numeric_string(s),
            _ => None,
        }
    }

    /// Conversion to Decimal.
    pub fn to_decimal(&self) -> Option<f64> {
        self.to_number().map(Number::as_f64)
    }

    /// Conversion to Int: Decimals rounded to the nearest integer, numeric Strings parsed as
    /// Decimal then truncated.
    pub fn to_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Decimal(d) => f64_to_i64(d.round()),
            Value::String(s) => match parse_numeric_string(s)? {
                Number::Int(i) => Some(i),
                Number::Decimal(d) => f64_to_i64(d.trunc()),
            },
            _ => None,
        }
    }

    /// Conversion to Boolean: Booleans, and the Strings `true`/`false` in any case.
    pub fn to_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }

    /// Conversion to String: numbers in plain form, Booleans as words, Arrays and Objects
    /// as JSON; Null and Undefined give Undefined. Raw bytes read as UTF-8 when they are.
    pub fn to_sql_string(&self) -> Option<String> {
        match self {
            Value::String(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Decimal(d) => Some(format_decimal(*d)),
            Value::Bool(b) => Some(b.to_string()),
            Value::Array(_) | Value::Object(_) => serde_json::to_string(self).ok(),
            Value::Binary(b) => std::str::from_utf8(b).ok().map(str::to_string),
            Value::Null | Value::Undefined => None,
        }
    }

    /// The text a substitution template inserts: Strings without quotes, other values as
    /// JSON, Undefined and Null as nothing.
    pub fn to_template_text(&self) -> String {
        match self {
            Value::Undefined => String::new(),
            Value::Null => "null".to_string(),
            other => other.to_sql_string().unwrap_or_default(),
        }
    }

    /// Turns whole-number Decimals into Ints throughout, as SQL version 2016-03-23 reads
    /// numbers such as `10.0`.
    pub fn normalize_whole_decimals(&mut self) {
        match self {
            Value::Decimal(d) if d.fract() == 0.0 && d.abs() < 9.0e15 => {
                let whole = *d as i64;
                *self = Value::Int(whole);
            }
            Value::Array(items) => items.iter_mut().for_each(Value::normalize_whole_decimals),
            Value::Object(map) => map.values_mut().for_each(Value::normalize_whole_decimals),
            _ => {}
        }
    }

    /// Parses a JSON document, or `None` when the bytes are not JSON.
    pub fn from_json_bytes(bytes: &[u8]) -> Option<Value> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn from_serde(value: &serde_json::Value) -> Value {
        match value {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::decimal(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Array(items) => {
                Value::Array(items.iter().map(Value::from_serde).collect())
            }
            serde_json::Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), Value::from_serde(v)))
                    .collect(),
            ),
        }
    }

    /// The value as serde_json sees it (Undefined members dropped, raw bytes as base64).
    pub fn to_serde(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The bytes a rule action receives: raw bytes as they are, Undefined as an empty
    /// payload, anything else as JSON.
    pub fn to_payload(&self) -> Bytes {
        match self {
            Value::Binary(b) => b.clone(),
            Value::Undefined => Bytes::new(),
            other => Bytes::from(serde_json::to_vec(other).unwrap_or_default()),
        }
    }
}

fn f64_to_i64(d: f64) -> Option<i64> {
    if d.is_finite() && d >= i64::MIN as f64 && d <= i64::MAX as f64 {
        Some(d as i64)
    } else {
        None
    }
}

/// Formats a Decimal the way AWS prints one: always with a fractional part or exponent.
pub fn format_decimal(d: f64) -> String {
    if d.fract() == 0.0 && d.abs() < 1e16 {
        format!("{d:.1}")
    } else {
        let mut s = String::new();
        let _ = write!(s, "{d}");
        s
    }
}

/// Parses `^-?\d+(\.\d+)?((?i)E-?\d+)?$`, the strings AWS converts to numbers.
pub fn parse_numeric_string(s: &str) -> Option<Number> {
    let bytes = s.as_bytes();
    let mut i = 0;
    if bytes.first() == Some(&b'-') {
        i += 1;
    }
    let digits_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    let mut integral = true;
    if i < bytes.len() && bytes[i] == b'.' {
        integral = false;
        i += 1;
        let frac_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == frac_start {
            return None;
        }
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        integral = false;
        i += 1;
        if i < bytes.len() && bytes[i] == b'-' {
            i += 1;
        }
        let exp_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return None;
        }
    }
    if i != bytes.len() {
        return None;
    }
    if integral {
        if let Ok(n) = s.parse::<i64>() {
            return Some(Number::Int(n));
        }
    }
    s.parse::<f64>()
        .ok()
        .filter(|d| d.is_finite())
        .map(Number::Decimal)
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Undefined | Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Decimal(d) if d.is_finite() => serializer.serialize_f64(*d),
            Value::Decimal(_) => serializer.serialize_unit(),
            Value::String(s) => serializer.serialize_str(s),
            Value::Binary(b) => {
                use base64::Engine as _;
                serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            Value::Array(items) => {
                let defined = items.iter().filter(|v| !v.is_undefined());
                let mut seq = serializer.serialize_seq(None)?;
                for item in defined {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut out = serializer.serialize_map(None)?;
                for (k, v) in map.iter().filter(|(_, v)| !v.is_undefined()) {
                    out.serialize_entry(k, v)?;
                }
                out.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v)
            .map(Value::Int)
            .unwrap_or(Value::Decimal(v as f64)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::decimal(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Object::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_strings_follow_the_documented_pattern() {
        assert_eq!(parse_numeric_string("12"), Some(Number::Int(12)));
        assert_eq!(parse_numeric_string("-1.5"), Some(Number::Decimal(-1.5)));
        assert_eq!(parse_numeric_string("2e3"), Some(Number::Decimal(2000.0)));
        assert_eq!(parse_numeric_string("2E-1"), Some(Number::Decimal(0.2)));
        for bad in ["", "-", "1.", ".5", "+1", "1e", "abc", "1 ", "0x10", "1e+2"] {
            assert_eq!(parse_numeric_string(bad), None, "{bad}");
        }
    }

    #[test]
    fn conversions_match_the_reference_table() {
        assert_eq!(Value::Decimal(2.5).to_int(), Some(3));
        assert_eq!(Value::Decimal(-2.5).to_int(), Some(-3));
        assert_eq!(Value::string("2.9").to_int(), Some(2));
        assert_eq!(Value::Bool(true).to_int(), None);
        assert_eq!(Value::Null.to_int(), None);
        assert_eq!(Value::string("TRUE").to_bool(), Some(true));
        assert_eq!(Value::Int(1).to_bool(), None);
        assert_eq!(Value::Decimal(3.0).to_sql_string().as_deref(), Some("3.0"));
        assert_eq!(Value::Int(3).to_sql_string().as_deref(), Some("3"));
        assert_eq!(Value::Null.to_sql_string(), None);
        assert_eq!(
            Value::Array(vec![Value::Int(1), Value::string("a")])
                .to_sql_string()
                .as_deref(),
            Some("[1,\"a\"]")
        );
    }

    #[test]
    fn json_round_trips_keep_key_order_and_drop_undefined_members() {
        let v = Value::from_json_bytes(br#"{"z":1,"a":{"y":2.5,"b":[true,null]}}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"z":1,"a":{"y":2.5,"b":[true,null]}}"#
        );
        let mut obj = Object::new();
        obj.insert("gone".into(), Value::Undefined);
        obj.insert("kept".into(), Value::Int(1));
        assert_eq!(
            serde_json::to_string(&Value::Object(obj)).unwrap(),
            r#"{"kept":1}"#
        );
        assert!(Value::from_json_bytes(b"\x00\x01binary").is_none());
        let mut whole = Value::from_json_bytes(br#"{"a":10.0,"b":[2.0,2.5]}"#).unwrap();
        whole.normalize_whole_decimals();
        assert_eq!(
            serde_json::to_string(&whole).unwrap(),
            r#"{"a":10,"b":[2,2.5]}"#
        );
    }
}
