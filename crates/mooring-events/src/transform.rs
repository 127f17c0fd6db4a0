//! Target input shaping: `Input`, `InputPath` and `InputTransformer`.
//!
//! With none of them a target receives the whole event. `Input` replaces it with static JSON
//! text; `InputPath` selects part of the event with a JSONPath (`$`, dot and bracket notation,
//! array indices); `InputTransformer` extracts values into named variables and substitutes
//! `<name>` placeholders in a template: as JSON where the placeholder stands as a value, as raw
//! text inside a JSON string. A path that selects nothing yields `null` as a value and empty
//! text inside a string.

use serde_json::{Map, Value};

use crate::model::{rfc3339_seconds, Rule};

/// The payload `target` receives for `event`.
pub fn shape(target: &Value, event: &Value, event_text: &str, rule: &Rule, now_ms: i64) -> String {
    if let Some(input) = target.get("Input").and_then(Value::as_str) {
        return input.to_string();
    }
    if let Some(path) = target.get("InputPath").and_then(Value::as_str) {
        return select(event, path)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "null".into());
    }
    if let Some(transformer) = target.get("InputTransformer") {
        let template = transformer
            .get("InputTemplate")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let empty = Map::new();
        let paths = transformer
            .get("InputPathsMap")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        return render_template(template, paths, event, rule, now_ms);
    }
    event_text.to_string()
}

/// Evaluates a simple JSONPath against `value`.
pub fn select<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    let rest = path.trim().strip_prefix('$')?;
    let mut current = value;
    let mut chars = rest;
    while !chars.is_empty() {
        if let Some(after) = chars.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let key = &after[..end];
            current = current.get(key)?;
            chars = &after[end..];
        } else if let Some(after) = chars.strip_prefix('[') {
            let end = after.find(']')?;
            let inner = after[..end].trim();
            current = if let Ok(index) = inner.parse::<usize>() {
                current.get(index)?
            } else {
                let key = inner.trim_matches(|c| c == '\'' || c == '"');
                current.get(key)?
            };
            chars = &after[end + 1..];
        } else {
            return None;
        }
    }
    Some(current)
}

fn render_template(
    template: &str,
    paths: &Map<String, Value>,
    event: &Value,
    rule: &Rule,
    now_ms: i64,
) -> String {
    let lookup = |name: &str| -> Option<Option<Value>> {
        match name {
            "aws.events.rule-arn" => Some(Some(Value::String(rule.arn.clone()))),
            "aws.events.rule-name" => Some(Some(Value::String(rule.name.clone()))),
            "aws.events.event.ingestion-time" => Some(Some(Value::String(rfc3339_seconds(now_ms)))),
            "aws.events.event.json" => Some(Some(event.clone())),
            "aws.events.event" => {
                let mut without = event.clone();
                if let Some(o) = without.as_object_mut() {
                    o.remove("detail");
                }
                Some(Some(without))
            }
            _ => paths
                .get(name)
                .and_then(Value::as_str)
                .map(|p| select(event, p).cloned()),
        }
    };
    let mut out = String::with_capacity(template.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        if c == '<' {
            if let Some(end) = rest.find('>') {
                let name = &rest[1..end];
                if let Some(found) = lookup(name) {
                    match (in_string, found) {
                        (true, Some(Value::String(s))) => out.push_str(&s),
                        (true, Some(other)) => out.push_str(&other.to_string()),
                        (true, None) => {}
                        (false, Some(v)) => out.push_str(&v.to_string()),
                        (false, None) => out.push_str("null"),
                    }
                    rest = &rest[end + 1..];
                    escaped = false;
                    continue;
                }
            }
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule() -> Rule {
        serde_json::from_value(json!({
            "name": "r", "bus": "default", "arn": "arn:aws:events:us-east-1:1:rule/r",
            "event_pattern": null, "schedule_expression": null, "state": "ENABLED",
            "description": null, "role_arn": null, "created_by": "1", "created_ms": 0
        }))
        .unwrap()
    }

    #[test]
    fn transformer_substitutes_json_values_and_raw_text() {
        let event =
            json!({"detail": {"instance": "i-1", "state": "RUNNING", "n": 3}, "resources": ["a"]});
        let target = json!({"InputTransformer": {
            "InputPathsMap": {"instance": "$.detail.instance", "state": "$.detail.state", "n": "$.detail.n", "r": "$.resources[0]", "missing": "$.detail.nope"},
            "InputTemplate": "{\"msg\": \"instance <instance> is <state> (<n>)\", \"n\": <n>, \"i\": <instance>, \"r\": <r>, \"m\": <missing>, \"rule\": <aws.events.rule-name>}"
        }});
        let out: Value = serde_json::from_str(&shape(&target, &event, "", &rule(), 0)).unwrap();
        assert_eq!(
            out,
            json!({"msg": "instance i-1 is RUNNING (3)", "n": 3, "i": "i-1", "r": "a", "m": null, "rule": "r"})
        );
        let plain = json!({"InputTransformer": {"InputPathsMap": {"s": "$.detail.state"}, "InputTemplate": "\"state is <s>\""}});
        assert_eq!(
            shape(&plain, &event, "", &rule(), 0),
            "\"state is RUNNING\""
        );
    }

    #[test]
    fn input_and_input_path() {
        let event = json!({"detail": {"a": [1, {"b": 2}]}});
        assert_eq!(
            shape(&json!({"Input": "{\"x\":1}"}), &event, "E", &rule(), 0),
            "{\"x\":1}"
        );
        assert_eq!(
            shape(
                &json!({"InputPath": "$.detail.a[1]"}),
                &event,
                "E",
                &rule(),
                0
            ),
            "{\"b\":2}"
        );
        assert_eq!(shape(&json!({}), &event, "E", &rule(), 0), "E");
    }
}
