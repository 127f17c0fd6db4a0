//! Evaluates a parsed statement against one message.
//!
//! [`MessageFacts`] is what the rules engine knows about a message (topic, payload, MQTT
//! properties, publisher); its payload is parsed as JSON at most once per SQL version and
//! shared by every rule that looks at it. Evaluation order follows AWS: SET variables, then
//! WHERE (which cannot see SELECT aliases), then the SELECT projection. Operators implement
//! the reference's tables, including Undefined propagation and implicit conversions.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;

use super::ast::*;
use super::functions;
use super::value::{Number, Object, Value};
use super::SqlVersion;

/// Functions that reach Mooring's other services; wired by the engine. Every method answers
/// a value synchronously (AWS bounds `aws_lambda` at 2 s); Undefined when unavailable.
pub trait ExternalFunctions: Send + Sync {
    fn aws_lambda(&self, _function_arn: &str, _input: &Value) -> Value {
        Value::Undefined
    }
    fn get_thing_shadow(&self, _thing_name: &str, _shadow_name: Option<&str>) -> Value {
        Value::Undefined
    }
    fn get_registry_data(&self, _api: &str, _thing_name: &str) -> Value {
        Value::Undefined
    }
}

/// The default: no registry, shadows or functions behind the SQL functions yet.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoExternalFunctions;

impl ExternalFunctions for NoExternalFunctions {}

/// Everything a statement can observe about a message.
#[derive(Debug, Default)]
pub struct MessageFacts {
    /// The topic as the rule sees it (Basic Ingest prefix removed).
    pub topic: String,
    pub payload: Bytes,
    pub client_id: Option<String>,
    pub principal: Option<String>,
    pub source_ip: Option<String>,
    pub trace_id: Option<String>,
    pub timestamp_ms: i64,
    pub account_id: String,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub payload_format_indicator: Option<u8>,
    parsed_2015: OnceLock<Option<Value>>,
    parsed_2016: OnceLock<Option<Value>>,
}

impl MessageFacts {
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> MessageFacts {
        MessageFacts {
            topic: topic.into(),
            payload: payload.into(),
            ..Default::default()
        }
    }

    /// The payload as JSON under `version`, or `None` when it is not JSON.
    pub fn document(&self, version: SqlVersion) -> Option<&Value> {
        match version {
            SqlVersion::V2015_10_08 => self
                .parsed_2015
                .get_or_init(|| Value::from_json_bytes(&self.payload))
                .as_ref(),
            SqlVersion::V2016_03_23 => self
                .parsed_2016
                .get_or_init(|| {
                    let mut v = Value::from_json_bytes(&self.payload)?;
                    v.normalize_whole_decimals();
                    Some(v)
                })
                .as_ref(),
        }
    }

    /// What `*` denotes: the JSON document, or the raw bytes of a non-JSON payload.
    pub fn star(&self, version: SqlVersion) -> Value {
        match self.document(version) {
            Some(doc) => doc.clone(),
            None => Value::Binary(self.payload.clone()),
        }
    }
}

/// The result of running a statement on a message.
#[derive(Debug, Clone)]
pub enum EvalOutcome {
    /// WHERE was true: the SELECT output and the SET variables (for action templates).
    Matched {
        output: Value,
        variables: Vec<(String, Value)>,
    },
    /// WHERE was anything but true.
    Filtered,
}

/// The evaluation environment shared by every expression of one statement run.
pub struct Env<'a> {
    pub facts: &'a MessageFacts,
    pub version: SqlVersion,
    pub variables: HashMap<String, Value>,
    pub external: &'a dyn ExternalFunctions,
}

impl<'a> Env<'a> {
    pub fn new(
        facts: &'a MessageFacts,
        version: SqlVersion,
        external: &'a dyn ExternalFunctions,
    ) -> Env<'a> {
        Env {
            facts,
            version,
            variables: HashMap::new(),
            external,
        }
    }
}

/// Runs `statement` on the message described by `facts`.
pub fn evaluate(
    statement: &Statement,
    facts: &MessageFacts,
    external: &dyn ExternalFunctions,
) -> EvalOutcome {
    let mut env = Env::new(facts, statement.version, external);
    let root = facts.document(statement.version);
    let mut variables = Vec::with_capacity(statement.set.len());
    for (name, expr) in &statement.set {
        let value = eval_expr(expr, root, &env);
        env.variables.insert(name.clone(), value.clone());
        variables.push((name.clone(), value));
    }
    if let Some(condition) = &statement.select.condition {
        if !is_true(&eval_expr(condition, root, &env)) {
            return EvalOutcome::Filtered;
        }
    }
    let output = project(&statement.select, root, &env, true);
    EvalOutcome::Matched { output, variables }
}

/// Evaluates a lone expression (a substitution template) against a message.
pub fn evaluate_expression(
    expr: &Expr,
    facts: &MessageFacts,
    version: SqlVersion,
    variables: &[(String, Value)],
    external: &dyn ExternalFunctions,
) -> Value {
    let mut env = Env::new(facts, version, external);
    env.variables.extend(variables.iter().cloned());
    eval_expr(expr, facts.document(version), &env)
}

fn is_true(v: &Value) -> bool {
    v.to_bool() == Some(true)
}

/// Builds a SELECT's output over `current` (the payload, or one element of a nested
/// query's source array).
fn project(select: &Select, current: Option<&Value>, env: &Env<'_>, top_level: bool) -> Value {
    if select.value {
        return match select.items.first() {
            Some(SelectItem::Expr { expr, .. }) => eval_expr(expr, current, env),
            _ => Value::Undefined,
        };
    }
    let mut out = Object::new();
    for (index, item) in select.items.iter().enumerate() {
        let positional = index + 1;
        match item {
            SelectItem::Star => {
                let star = if top_level {
                    env.facts.star(env.version)
                } else {
                    current.cloned().unwrap_or(Value::Undefined)
                };
                match star {
                    Value::Object(map) => out.extend(map),
                    other if select.items.len() == 1 => return other,
                    _ => {}
                }
            }
            SelectItem::Expr { expr, alias } => {
                let value = eval_expr(expr, current, env);
                match alias {
                    Some(path) => insert_path(&mut out, path, value),
                    None => {
                        let key = default_name(expr).unwrap_or_else(|| format!("_{positional}"));
                        out.insert(key, value);
                    }
                }
            }
        }
    }
    Value::Object(out)
}

fn insert_path(out: &mut Object, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            out.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = out
                .entry(first.clone())
                .or_insert_with(|| Value::Object(Object::new()));
            if !matches!(entry, Value::Object(_)) {
                *entry = Value::Object(Object::new());
            }
            if let Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// The output key of an unaliased SELECT item: the last attribute name of a path, or the
/// function's name for a call.
fn default_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Attribute(name) | Expr::Member(_, name) => Some(name.clone()),
        Expr::Index(base, _) => default_name(base),
        Expr::Variable(name) => Some(name.clone()),
        Expr::Call(call) => Some(call.name.clone()),
        Expr::Cast(..) => Some("cast".to_string()),
        _ => None,
    }
}

/// Resolves an attribute path (`a.b[0].c`) by reference, without copying the documents it
/// walks through. `None` when `expr` is not such a path (or needs the general evaluator);
/// `Some(None)` when the path leads nowhere (Undefined).
fn path_ref<'v>(expr: &Expr, current: Option<&'v Value>) -> Option<Option<&'v Value>> {
    match expr {
        Expr::Attribute(name) => Some(match current {
            Some(Value::Object(map)) => map.get(name),
            _ => None,
        }),
        Expr::Member(base, name) => Some(match path_ref(base, current)? {
            Some(Value::Object(map)) => map.get(name),
            _ => None,
        }),
        Expr::Index(base, index) => {
            let Expr::Literal(Value::Int(i)) = index.as_ref() else {
                return None;
            };
            match path_ref(base, current)? {
                Some(Value::Array(items)) => {
                    Some(usize::try_from(*i).ok().and_then(|i| items.get(i)))
                }
                None => Some(None),
                Some(_) => None,
            }
        }
        _ => None,
    }
}

pub(crate) fn eval_expr(expr: &Expr, current: Option<&Value>, env: &Env<'_>) -> Value {
    if matches!(
        expr,
        Expr::Attribute(_) | Expr::Member(..) | Expr::Index(..)
    ) {
        if let Some(found) = path_ref(expr, current) {
            return found.cloned().unwrap_or(Value::Undefined);
        }
    }
    match expr {
        Expr::Literal(v) => v.clone(),
        Expr::Payload => env.facts.star(env.version),
        Expr::Attribute(name) => match current {
            Some(Value::Object(map)) => map.get(name).cloned().unwrap_or(Value::Undefined),
            _ => Value::Undefined,
        },
        Expr::Variable(name) => env.variables.get(name).cloned().unwrap_or(Value::Undefined),
        Expr::Member(base, name) => match eval_expr(base, current, env) {
            Value::Object(mut map) => map.swap_remove(name).unwrap_or(Value::Undefined),
            _ => Value::Undefined,
        },
        Expr::Index(base, index) => {
            let base = eval_expr(base, current, env);
            let index = eval_expr(index, current, env);
            functions::get(&base, &index)
        }
        Expr::Call(call) => {
            let args: Vec<Value> = call
                .args
                .iter()
                .enumerate()
                .map(|(i, a)| match a {
                    // encode(*, ...) encodes the raw payload bytes, JSON or not.
                    Expr::Payload if i == 0 && call.name == "encode" => {
                        Value::Binary(env.facts.payload.clone())
                    }
                    other => eval_expr(other, current, env),
                })
                .collect();
            functions::call(&call.name, &args, call.regex.as_deref(), env)
        }
        Expr::Cast(inner, to) => cast(eval_expr(inner, current, env), *to),
        Expr::Unary(op, inner) => {
            let v = eval_expr(inner, current, env);
            match op {
                UnaryOp::Not => v.to_bool().map(|b| Value::Bool(!b)).unwrap_or_default(),
                UnaryOp::Neg => match v.to_number() {
                    Some(Number::Int(i)) => i
                        .checked_neg()
                        .map(Value::Int)
                        .unwrap_or(Value::Decimal(-(i as f64))),
                    Some(Number::Decimal(d)) => Value::Decimal(-d),
                    None => Value::Undefined,
                },
            }
        }
        Expr::Binary(op, left, right) => {
            let l = eval_expr(left, current, env);
            let r = eval_expr(right, current, env);
            binary(*op, &l, &r)
        }
        Expr::Is {
            expr,
            negated,
            undefined,
        } => {
            let v = eval_expr(expr, current, env);
            let is = if *undefined {
                v.is_undefined()
            } else {
                v.is_null()
            };
            Value::Bool(is != *negated)
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            let subject = match operand {
                Some(o) => {
                    let v = eval_expr(o, current, env);
                    if v.is_undefined() {
                        return Value::Undefined;
                    }
                    Some(v)
                }
                None => None,
            };
            for (test, result) in whens {
                let t = eval_expr(test, current, env);
                let hit = match &subject {
                    Some(s) => matches!(equals(s, &t), Value::Bool(true)),
                    None => is_true(&t),
                };
                if hit {
                    return eval_expr(result, current, env);
                }
            }
            match otherwise {
                Some(e) => eval_expr(e, current, env),
                None => Value::Undefined,
            }
        }
        Expr::Array(items) => {
            Value::Array(items.iter().map(|e| eval_expr(e, current, env)).collect())
        }
        Expr::Object(members) => Value::Object(
            members
                .iter()
                .map(|(k, e)| (k.clone(), eval_expr(e, current, env)))
                .collect(),
        ),
        Expr::Subquery(select) => {
            let source = match &select.source {
                Some(s) => eval_expr(s, current, env),
                None => return Value::Undefined,
            };
            let Value::Array(elements) = source else {
                return Value::Undefined;
            };
            let mut out = Vec::new();
            for element in &elements {
                if let Some(condition) = &select.condition {
                    if !is_true(&eval_expr(condition, Some(element), env)) {
                        continue;
                    }
                }
                let projected = project(select, Some(element), env, false);
                if !projected.is_undefined() {
                    out.push(projected);
                }
            }
            Value::Array(out)
        }
    }
}

/// `cast(v AS type)`.
pub fn cast(v: Value, to: CastType) -> Value {
    match to {
        CastType::String => v.to_sql_string().map(Value::String).unwrap_or_default(),
        CastType::Int => match v {
            Value::Bool(b) => Value::Int(b as i64),
            Value::Int(i) => Value::Int(i),
            Value::Decimal(d) => floor_int(d),
            Value::String(ref s) => match super::value::parse_numeric_string(s) {
                Some(Number::Int(i)) => Value::Int(i),
                Some(Number::Decimal(d)) => floor_int(d),
                None => Value::Undefined,
            },
            _ => Value::Undefined,
        },
        CastType::Decimal => match v {
            Value::Bool(b) => Value::Decimal(if b { 1.0 } else { 0.0 }),
            other => other
                .to_decimal()
                .map(Value::Decimal)
                .unwrap_or(Value::Undefined),
        },
        CastType::Boolean => match v {
            Value::Bool(b) => Value::Bool(b),
            Value::Int(i) => Value::Bool(i != 0),
            Value::Decimal(d) => Value::Bool(d != 0.0),
            other => other.to_bool().map(Value::Bool).unwrap_or_default(),
        },
    }
}

fn floor_int(d: f64) -> Value {
    let f = d.floor();
    if f.is_finite() && f.abs() < 9.2e18 {
        Value::Int(f as i64)
    } else {
        Value::Undefined
    }
}

/// `=`: Undefined when either side is; numbers compare by value; otherwise same type and
/// same contents; mismatched types are not equal.
pub fn equals(l: &Value, r: &Value) -> Value {
    if l.is_undefined() || r.is_undefined() {
        return Value::Undefined;
    }
    Value::Bool(l == r)
}

/// Applies a binary operator.
pub fn binary(op: BinaryOp, l: &Value, r: &Value) -> Value {
    match op {
        BinaryOp::And | BinaryOp::Or => match (l.to_bool(), r.to_bool()) {
            (Some(a), Some(b)) => Value::Bool(if op == BinaryOp::And { a && b } else { a || b }),
            _ => Value::Undefined,
        },
        BinaryOp::Eq => equals(l, r),
        BinaryOp::NotEq => match equals(l, r) {
            Value::Bool(b) => Value::Bool(!b),
            other => other,
        },
        BinaryOp::Lt | BinaryOp::LtEq | BinaryOp::Gt | BinaryOp::GtEq => {
            match (l.to_decimal(), r.to_decimal()) {
                (Some(a), Some(b)) => Value::Bool(match op {
                    BinaryOp::Lt => a < b,
                    BinaryOp::LtEq => a <= b,
                    BinaryOp::Gt => a > b,
                    _ => a >= b,
                }),
                _ => Value::Undefined,
            }
        }
        BinaryOp::Add => {
            if matches!(l, Value::String(_)) || matches!(r, Value::String(_)) {
                return match (l.to_sql_string(), r.to_sql_string()) {
                    (Some(a), Some(b)) => Value::String(a + &b),
                    _ => Value::Undefined,
                };
            }
            arithmetic(l, r, i64::checked_add, |a, b| a + b)
        }
        BinaryOp::Sub => arithmetic(l, r, i64::checked_sub, |a, b| a - b),
        BinaryOp::Mul => arithmetic(l, r, i64::checked_mul, |a, b| a * b),
        BinaryOp::Div => match (l.to_number(), r.to_number()) {
            (Some(_), Some(divisor)) if divisor.as_f64() == 0.0 => Value::Undefined,
            (Some(Number::Int(a)), Some(Number::Int(b))) => a
                .checked_div(b)
                .map(Value::Int)
                .unwrap_or(Value::Decimal(a as f64 / b as f64)),
            (Some(a), Some(b)) => Value::decimal(a.as_f64() / b.as_f64()),
            _ => Value::Undefined,
        },
        BinaryOp::Mod => functions::modulo(l, r),
        BinaryOp::In => match r {
            _ if l.is_undefined() => Value::Undefined,
            Value::Array(items) => Value::Bool(items.iter().any(|i| i == l)),
            Value::Object(map) => Value::Bool(map.values().any(|v| v == l)),
            Value::String(s) => match l.to_sql_string() {
                Some(needle) => Value::Bool(s.contains(&needle)),
                None => Value::Undefined,
            },
            _ => Value::Undefined,
        },
    }
}

fn arithmetic(
    l: &Value,
    r: &Value,
    int_op: fn(i64, i64) -> Option<i64>,
    dec_op: fn(f64, f64) -> f64,
) -> Value {
    match (l.to_number(), r.to_number()) {
        (Some(Number::Int(a)), Some(Number::Int(b))) => int_op(a, b)
            .map(Value::Int)
            .unwrap_or_else(|| Value::decimal(dec_op(a as f64, b as f64))),
        (Some(a), Some(b)) => Value::decimal(dec_op(a.as_f64(), b.as_f64())),
        _ => Value::Undefined,
    }
}
