//! The built-in functions of AWS IoT SQL.
//!
//! [`signature`] tells the parser which names exist, their argument counts, whether they
//! need SQL version 2016-03-23, and whether they run locally, through Mooring's own services
//! ([`FunctionKind::External`]: `aws_lambda`, `get_thing_shadow`, `get_registry_data`, via
//! the [`ExternalFunctions`](super::ExternalFunctions) trait) or need a cloud service Mooring
//! does not have (`get_dynamodb`, `get_secret`, `machinelearning_predict`: refused at rule
//! creation). [`call`] evaluates one call on already evaluated arguments. Wrong argument
//! types give Undefined, as AWS documents; Null arguments of numeric and string functions
//! give Undefined too.

use base64::Engine as _;
use sha2::Digest as _;

use super::eval::Env;
use super::time_pattern::{self, Zone};
use super::value::{Number, Object, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    Local,
    External,
    Cloud,
}

#[derive(Debug, Clone, Copy)]
pub struct Signature {
    pub min_args: usize,
    pub max_args: usize,
    pub since_2016: bool,
    pub kind: FunctionKind,
}

const fn sig(min_args: usize, max_args: usize, since_2016: bool) -> Signature {
    Signature {
        min_args,
        max_args,
        since_2016,
        kind: FunctionKind::Local,
    }
}

/// The signature of a function, by lower-cased name.
pub fn signature(name: &str) -> Option<Signature> {
    let s = match name {
        "accountid" | "clientid" | "newuuid" | "principal" | "rand" | "sourceip"
        | "sql_version" | "timestamp" | "traceid" => sig(0, 0, false),
        "abs"
        | "acos"
        | "asin"
        | "atan"
        | "bitnot"
        | "ceil"
        | "chr"
        | "cos"
        | "cosh"
        | "exp"
        | "floor"
        | "ln"
        | "log"
        | "lower"
        | "upper"
        | "ltrim"
        | "rtrim"
        | "trim"
        | "round"
        | "sign"
        | "sin"
        | "sinh"
        | "sqrt"
        | "tan"
        | "tanh"
        | "md2"
        | "md5"
        | "sha1"
        | "sha224"
        | "sha256"
        | "sha384"
        | "sha512"
        | "isnull"
        | "get_mqtt_property"
        | "get_user_properties" => sig(1, 1, false),
        "isundefined" | "length" | "numbytes" => sig(1, 1, true),
        "atan2" | "bitand" | "bitor" | "bitxor" | "endswith" | "startswith" | "get" | "lpad"
        | "rpad" | "mod" | "remainder" | "nanvl" | "power" | "regexp_matches" | "regexp_substr"
        | "trunc" => sig(2, 2, false),
        "indexof" | "time_to_epoch" | "encode" | "get_or_default" => sig(2, 2, true),
        "decode" => sig(2, 4, true),
        "regexp_replace" | "replace" => sig(3, 3, false),
        "transform" => sig(3, 3, true),
        "substring" => sig(2, 3, false),
        "parse_time" => sig(2, 3, true),
        "topic" => sig(0, 1, false),
        "concat" => sig(0, usize::MAX, false),
        "aws_lambda" => Signature {
            kind: FunctionKind::External,
            ..sig(2, 2, false)
        },
        "get_thing_shadow" => Signature {
            kind: FunctionKind::External,
            ..sig(2, 3, true)
        },
        "get_registry_data" => Signature {
            kind: FunctionKind::External,
            ..sig(3, 3, true)
        },
        "get_dynamodb" | "get_secret" | "machinelearning_predict" => Signature {
            kind: FunctionKind::Cloud,
            ..sig(0, usize::MAX, true)
        },
        _ => return None,
    };
    Some(s)
}

/// Evaluates `name` on `args`.
pub fn call(name: &str, args: &[Value], regex: Option<&regex::Regex>, env: &Env<'_>) -> Value {
    let arg = |i: usize| args.get(i).unwrap_or(&Value::Undefined);
    match name {
        // Message and rule context.
        "accountid" => Value::string(env.facts.account_id.clone()),
        "clientid" => Value::string(env.facts.client_id.clone().unwrap_or_else(|| "n/a".into())),
        "principal" => opt_string(&env.facts.principal),
        "sourceip" => opt_string(&env.facts.source_ip),
        "traceid" => opt_string(&env.facts.trace_id),
        "timestamp" => Value::Int(env.facts.timestamp_ms),
        "sql_version" => Value::string(env.version.as_str()),
        "newuuid" => Value::string(uuid::Uuid::new_v4().to_string()),
        "rand" => Value::Decimal(rand::random::<f64>()),
        "topic" => topic(env, args),
        "get_mqtt_property" => mqtt_property(env, arg(0)),
        "get_user_properties" => user_properties(env, arg(0)),

        // Math.
        "abs" => number1(arg(0), |n| match n {
            Number::Int(i) => i
                .checked_abs()
                .map(Value::Int)
                .unwrap_or(Value::Decimal((i as f64).abs())),
            Number::Decimal(d) => Value::decimal(d.abs()),
        }),
        "ceil" => number1(arg(0), |n| match n {
            Number::Int(i) => Value::Int(i),
            Number::Decimal(d) => whole(d.ceil()),
        }),
        "floor" => number1(arg(0), |n| match n {
            Number::Int(i) => Value::Int(i),
            Number::Decimal(d) => whole(d.floor()),
        }),
        "round" => number1(arg(0), |n| match n {
            Number::Int(i) => Value::Int(i),
            Number::Decimal(d) => whole(d.round()),
        }),
        "sign" => number1(arg(0), |n| {
            let d = n.as_f64();
            Value::Int(if d > 0.0 {
                1
            } else if d < 0.0 {
                -1
            } else {
                0
            })
        }),
        "acos" => double1(arg(0), f64::acos),
        "asin" => double1(arg(0), f64::asin),
        "atan" => double1(arg(0), f64::atan),
        "cos" => double1(arg(0), f64::cos),
        "cosh" => double1(arg(0), f64::cosh),
        "exp" => double1(arg(0), f64::exp),
        "ln" => double1(arg(0), f64::ln),
        "log" => double1(arg(0), f64::log10),
        "sin" => double1(arg(0), f64::sin),
        "sinh" => double1(arg(0), f64::sinh),
        "sqrt" => double1(arg(0), f64::sqrt),
        "tan" => double1(arg(0), f64::tan),
        "tanh" => double1(arg(0), f64::tanh),
        "atan2" => double2(arg(0), arg(1), f64::atan2),
        "power" => double2(arg(0), arg(1), f64::powf),
        "mod" | "remainder" => modulo(arg(0), arg(1)),
        "trunc" => trunc(arg(0), arg(1)),
        "bitand" => bits2(arg(0), arg(1), |a, b| a & b),
        "bitor" => bits2(arg(0), arg(1), |a, b| a | b),
        "bitxor" => bits2(arg(0), arg(1), |a, b| a ^ b),
        "bitnot" => match bit_int(arg(0)) {
            Some(a) => Value::Int(!a),
            None => Value::Undefined,
        },
        "nanvl" => match arg(0) {
            Value::Undefined | Value::Null => arg(1).clone(),
            Value::Decimal(d) if d.is_nan() => arg(1).clone(),
            Value::String(s) if s == "NaN" => arg(1).clone(),
            other => other.clone(),
        },

        // Strings.
        "chr" => match arg(0).to_int() {
            Some(code) => u32::try_from(code)
                .ok()
                .and_then(char::from_u32)
                .map(|c| Value::String(c.to_string()))
                .unwrap_or(Value::Undefined),
            None => Value::Undefined,
        },
        "concat" => concat(args),
        "endswith" => strings2(arg(0), arg(1), |a, b| Value::Bool(a.ends_with(b))),
        "startswith" => strings2(arg(0), arg(1), |a, b| Value::Bool(a.starts_with(b))),
        "indexof" => match (arg(0), arg(1)) {
            (Value::String(a), Value::String(b)) => Value::Int(
                a.find(b.as_str())
                    .map(|byte| a[..byte].chars().count() as i64)
                    .unwrap_or(-1),
            ),
            _ => Value::Undefined,
        },
        "length" => string1(arg(0), |s| Value::Int(s.chars().count() as i64)),
        "numbytes" => string1(arg(0), |s| Value::Int(s.len() as i64)),
        "lower" => string1(arg(0), |s| Value::String(s.to_lowercase())),
        "upper" => string1(arg(0), |s| Value::String(s.to_uppercase())),
        "ltrim" => string1(arg(0), |s| Value::string(s.trim_start())),
        "rtrim" => string1(arg(0), |s| Value::string(s.trim_end())),
        "trim" => string1(arg(0), |s| Value::string(s.trim())),
        "lpad" | "rpad" => {
            let (Some(s), Some(n)) = (arg(0).to_sql_string(), arg(1).to_int()) else {
                return Value::Undefined;
            };
            let padding = " ".repeat(n.clamp(0, 1000) as usize);
            if name == "lpad" {
                Value::String(padding + &s)
            } else {
                Value::String(s + &padding)
            }
        }
        "replace" => match (
            arg(0).to_sql_string(),
            arg(1).to_sql_string(),
            arg(2).to_sql_string(),
        ) {
            (Some(s), Some(from), Some(to)) if !from.is_empty() => {
                Value::String(s.replace(&from, &to))
            }
            (Some(s), Some(_), Some(_)) => Value::String(s),
            _ => Value::Undefined,
        },
        "substring" => substring(arg(0), arg(1), args.get(2)),
        "regexp_matches" => with_regex(arg(0), arg(1), regex, |s, re| Value::Bool(re.is_match(s))),
        "regexp_substr" => with_regex(arg(0), arg(1), regex, |s, re| {
            Value::string(re.find(s).map(|m| m.as_str()).unwrap_or(""))
        }),
        "regexp_replace" => {
            let Some(replacement) = arg(2).to_sql_string() else {
                return Value::Undefined;
            };
            let replacement = java_replacement(&replacement);
            with_regex(arg(0), arg(1), regex, |s, re| {
                Value::String(re.replace_all(s, replacement.as_str()).into_owned())
            })
        }

        // Hashing and encoding.
        "md2" => hash(arg(0), |b| hex::encode(md2::Md2::digest(b))),
        "md5" => hash(arg(0), |b| hex::encode(md5::Md5::digest(b))),
        "sha1" => hash(arg(0), |b| hex::encode(sha1::Sha1::digest(b))),
        "sha224" => hash(arg(0), |b| hex::encode(sha2::Sha224::digest(b))),
        "sha256" => hash(arg(0), |b| hex::encode(sha2::Sha256::digest(b))),
        "sha384" => hash(arg(0), |b| hex::encode(sha2::Sha384::digest(b))),
        "sha512" => hash(arg(0), |b| hex::encode(sha2::Sha512::digest(b))),
        "encode" => encode(arg(0), arg(1)),
        "decode" => decode(arg(0), arg(1), env),

        // Collections and types.
        "get" => get(arg(0), arg(1)),
        "get_or_default" => match arg(0) {
            Value::Undefined => arg(1).clone(),
            other => other.clone(),
        },
        "isnull" => Value::Bool(arg(0).is_null()),
        "isundefined" => Value::Bool(arg(0).is_undefined()),
        "transform" => transform(arg(0), arg(1), arg(2)),

        // Time.
        "parse_time" => {
            let (Some(pattern), Some(millis)) = (string_only(arg(0)), arg(1).to_int()) else {
                return Value::Undefined;
            };
            let zone = match args.get(2) {
                None => Zone::utc(),
                Some(v) => match string_only(v).and_then(|z| Zone::parse(&z)) {
                    Some(zone) => zone,
                    None => return Value::Undefined,
                },
            };
            time_pattern::format_joda(&pattern, millis, zone)
                .map(Value::String)
                .unwrap_or(Value::Undefined)
        }
        "time_to_epoch" => match (string_only(arg(0)), string_only(arg(1))) {
            (Some(text), Some(pattern)) => time_pattern::parse_java(&text, &pattern)
                .map(Value::Int)
                .unwrap_or(Value::Undefined),
            _ => Value::Undefined,
        },

        // Mooring's own services.
        "aws_lambda" => match string_only(arg(0)) {
            Some(function) if !arg(1).is_undefined() => env.external.aws_lambda(&function, arg(1)),
            _ => Value::Undefined,
        },
        "get_thing_shadow" => {
            let thing = string_only(arg(0));
            let shadow = if args.len() == 3 {
                match string_only(arg(1)) {
                    Some(s) => Some(s),
                    None => return Value::Undefined,
                }
            } else {
                None
            };
            match thing {
                Some(thing) => env.external.get_thing_shadow(&thing, shadow.as_deref()),
                None => Value::Undefined,
            }
        }
        "get_registry_data" => match (string_only(arg(0)), string_only(arg(1))) {
            (Some(api), Some(thing)) => env.external.get_registry_data(&api, &thing),
            _ => Value::Undefined,
        },
        _ => Value::Undefined,
    }
}

fn opt_string(v: &Option<String>) -> Value {
    v.clone().map(Value::String).unwrap_or(Value::Undefined)
}

fn string_only(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A whole-number result as Int when it fits.
fn whole(d: f64) -> Value {
    if d.is_finite() && d.abs() < 9.2e18 {
        Value::Int(d as i64)
    } else {
        Value::decimal(d)
    }
}

fn number1(v: &Value, f: impl FnOnce(Number) -> Value) -> Value {
    v.to_number().map(f).unwrap_or(Value::Undefined)
}

fn double1(v: &Value, f: impl FnOnce(f64) -> f64) -> Value {
    v.to_decimal()
        .map(|d| Value::decimal(f(d)))
        .unwrap_or(Value::Undefined)
}

fn double2(a: &Value, b: &Value, f: impl FnOnce(f64, f64) -> f64) -> Value {
    match (a.to_decimal(), b.to_decimal()) {
        (Some(a), Some(b)) => Value::decimal(f(a, b)),
        _ => Value::Undefined,
    }
}

/// `%`, `mod` and `remainder`: Int for two Ints, Decimal otherwise (numeric strings included).
pub fn modulo(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => {
            if *y == 0 {
                Value::Undefined
            } else {
                Value::Int(x.wrapping_rem(*y))
            }
        }
        _ => match (a.to_decimal(), b.to_decimal()) {
            (Some(x), Some(y)) if y != 0.0 => Value::decimal(x % y),
            _ => Value::Undefined,
        },
    }
}

fn trunc(n: &Value, digits: &Value) -> Value {
    let Some(number) = n.to_number() else {
        return Value::Undefined;
    };
    let Some(digits) = digits.to_int() else {
        return Value::Undefined;
    };
    let d = match number {
        Number::Int(i) => return Value::Int(i),
        Number::Decimal(d) => d,
    };
    let digits = digits.clamp(0, 34) as usize;
    let text = format!("{d}");
    let cut = match text.split_once('.') {
        Some((int, _)) if digits == 0 => int.to_string(),
        Some((int, frac)) => format!("{int}.{}", &frac[..frac.len().min(digits)]),
        None => text,
    };
    let value: f64 = cut.parse().unwrap_or(d);
    if value.fract() == 0.0 {
        whole(value)
    } else {
        Value::decimal(value)
    }
}

/// Int conversion for the bit functions: Decimals and numeric strings rounded down.
fn bit_int(v: &Value) -> Option<i64> {
    match v.to_number()? {
        Number::Int(i) => Some(i),
        Number::Decimal(d) => {
            let f = d.floor();
            (f.is_finite() && f.abs() < 9.2e18).then_some(f as i64)
        }
    }
}

fn bits2(a: &Value, b: &Value, f: impl FnOnce(i64, i64) -> i64) -> Value {
    match (bit_int(a), bit_int(b)) {
        (Some(a), Some(b)) => Value::Int(f(a, b)),
        _ => Value::Undefined,
    }
}

fn string1(v: &Value, f: impl FnOnce(&str) -> Value) -> Value {
    match v.to_sql_string() {
        Some(s) => f(&s),
        None => Value::Undefined,
    }
}

fn strings2(a: &Value, b: &Value, f: impl FnOnce(&str, &str) -> Value) -> Value {
    match (a.to_sql_string(), b.to_sql_string()) {
        (Some(a), Some(b)) => f(&a, &b),
        _ => Value::Undefined,
    }
}

fn concat(args: &[Value]) -> Value {
    match args {
        [] => Value::Undefined,
        [one] => one.clone(),
        _ if args.iter().any(|a| matches!(a, Value::Array(_))) => {
            let mut out = Vec::new();
            for a in args {
                match a {
                    Value::Array(items) => out.extend(items.iter().cloned()),
                    Value::Undefined => return Value::Undefined,
                    other => out.push(other.clone()),
                }
            }
            Value::Array(out)
        }
        _ => {
            let mut out = String::new();
            for a in args {
                match a.to_sql_string() {
                    Some(s) => out.push_str(&s),
                    None => return Value::Undefined,
                }
            }
            Value::String(out)
        }
    }
}

fn substring(s: &Value, start: &Value, end: Option<&Value>) -> Value {
    let Some(s) = s.to_sql_string() else {
        return Value::Undefined;
    };
    let Some(start) = start.to_int() else {
        return Value::Undefined;
    };
    let chars: Vec<char> = s.chars().collect();
    let len = chars.len() as i64;
    let end = match end {
        None => len,
        Some(e) => match e.to_int() {
            Some(e) => e,
            None => return Value::Undefined,
        },
    };
    let start = start.clamp(0, len) as usize;
    let end = end.clamp(0, len) as usize;
    if start >= end {
        return Value::string("");
    }
    Value::String(chars[start..end].iter().collect())
}

fn with_regex(
    s: &Value,
    pattern: &Value,
    compiled: Option<&regex::Regex>,
    f: impl FnOnce(&str, &regex::Regex) -> Value,
) -> Value {
    let Some(s) = s.to_sql_string() else {
        return Value::Undefined;
    };
    if let Some(re) = compiled {
        return f(&s, re);
    }
    let Some(pattern) = pattern.to_sql_string() else {
        return Value::Undefined;
    };
    match regex::Regex::new(&pattern) {
        Ok(re) => f(&s, &re),
        Err(_) => Value::Undefined,
    }
}

/// Rewrites a Java replacement string (`$1`, `\$`) into the `regex` crate's syntax
/// (`${1}`, `$$`).
fn java_replacement(java: &str) -> String {
    let mut out = String::new();
    let mut chars = java.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('$') => out.push_str("$$"),
                Some(other) => out.push(other),
                None => {}
            },
            '$' => {
                let mut group = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    group.push(*d);
                    chars.next();
                }
                if group.is_empty() {
                    out.push_str("$$");
                } else {
                    out.push_str(&format!("${{{group}}}"));
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn hash(v: &Value, f: impl FnOnce(&[u8]) -> String) -> Value {
    match v {
        Value::Binary(b) => Value::String(f(b)),
        other => match other.to_sql_string() {
            Some(s) => Value::String(f(s.as_bytes())),
            None => Value::Undefined,
        },
    }
}

fn encode(v: &Value, scheme: &Value) -> Value {
    if !matches!(scheme, Value::String(s) if s == "base64") {
        return Value::Undefined;
    }
    let engine = base64::engine::general_purpose::STANDARD;
    match v {
        Value::Binary(b) => Value::String(engine.encode(b)),
        other => match other.to_sql_string() {
            Some(s) => Value::String(engine.encode(s.as_bytes())),
            None => Value::Undefined,
        },
    }
}

fn decode(v: &Value, scheme: &Value, env: &Env<'_>) -> Value {
    if !matches!(scheme, Value::String(s) if s == "base64") {
        return Value::Undefined;
    }
    let Value::String(text) = v else {
        return Value::Undefined;
    };
    let cleaned: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(cleaned.trim_end_matches('='))
        });
    let Ok(bytes) = decoded else {
        return Value::Null;
    };
    if let Some(mut json) = Value::from_json_bytes(&bytes) {
        if env.version.whole_decimals_are_ints() {
            json.normalize_whole_decimals();
        }
        return json;
    }
    match String::from_utf8(bytes) {
        Ok(s) => Value::String(s),
        Err(e) => Value::Binary(e.into_bytes().into()),
    }
}

/// `get(collection, key)`.
pub fn get(collection: &Value, key: &Value) -> Value {
    match collection {
        Value::Array(items) => key
            .to_int()
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| items.get(i).cloned())
            .unwrap_or(Value::Undefined),
        Value::String(s) => key
            .to_int()
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| s.chars().nth(i))
            .map(|c| Value::String(c.to_string()))
            .unwrap_or(Value::Undefined),
        Value::Object(map) => match key {
            Value::String(k) => map.get(k).cloned().unwrap_or(Value::Undefined),
            _ => Value::Undefined,
        },
        _ => Value::Undefined,
    }
}

fn transform(mode: &Value, object: &Value, array: &Value) -> Value {
    if !matches!(mode, Value::String(m) if m == "enrichArray") {
        return Value::Undefined;
    }
    let (Value::Object(extra), Value::Array(items)) = (object, array) else {
        return Value::Undefined;
    };
    let out: Vec<Value> = items
        .iter()
        .map(|item| match item {
            Value::Object(fields) => {
                let mut merged: Object = fields.clone();
                for (k, v) in extra {
                    merged.insert(k.clone(), v.clone());
                }
                Value::Object(merged)
            }
            other => other.clone(),
        })
        .collect();
    let result = Value::Array(out);
    if serde_json::to_vec(&result).map(|b| b.len()).unwrap_or(0) > 128 * 1024 {
        return Value::Undefined;
    }
    result
}

fn topic(env: &Env<'_>, args: &[Value]) -> Value {
    let topic = &env.facts.topic;
    match args.first() {
        None => Value::string(topic.clone()),
        Some(n) => match n.to_int() {
            Some(n) if n >= 1 => topic
                .split('/')
                .nth((n - 1) as usize)
                .map(Value::string)
                .unwrap_or(Value::Undefined),
            _ => Value::Undefined,
        },
    }
}

fn mqtt_property(env: &Env<'_>, name: &Value) -> Value {
    let Value::String(name) = name else {
        return Value::Undefined;
    };
    let facts = env.facts;
    match name.as_str() {
        "format_indicator" => match facts.payload_format_indicator {
            Some(1) => Value::string("UTF8_DATA"),
            Some(_) => Value::string("UNSPECIFIED_BYTES"),
            None => Value::Undefined,
        },
        "content_type" => opt_string(&facts.content_type),
        "response_topic" => opt_string(&facts.response_topic),
        "correlation_data" => facts
            .correlation_data
            .as_ref()
            .map(|b| Value::String(base64::engine::general_purpose::STANDARD.encode(b)))
            .unwrap_or(Value::Undefined),
        _ => Value::Undefined,
    }
}

fn user_properties(env: &Env<'_>, key: &Value) -> Value {
    let Value::String(key) = key else {
        return Value::Undefined;
    };
    let values: Vec<Value> = env
        .facts
        .user_properties
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| Value::string(v.clone()))
        .collect();
    if values.is_empty() {
        Value::Undefined
    } else {
        Value::Array(values)
    }
}
