//! IoT policy documents: parsing with AWS IoT's grammar checks, and evaluation.
//!
//! A document is IAM-like JSON (`Version`, `Statement` with `Effect`, `Action`/`NotAction`,
//! `Resource`/`NotResource`, optional `Condition`). [`PolicyDocument::parse`] rejects what
//! AWS answers with `MalformedPolicyException`; [`decide`] evaluates a set of documents for
//! one request: an explicit Deny wins, else any Allow, else the implicit deny.
//!
//! Resource and action patterns use IAM wildcards (`*` any run of characters including `/`,
//! `?` exactly one); MQTT's `+` and `#` are literal. Policy variables (`${iot:ClientId}`,
//! `${iot:Connection.Thing.ThingName}`, certificate variables, ...) are substituted from the
//! request's [`Context`] as literal text, so a client id containing `*` never widens a
//! pattern; `${*}`, `${?}` and `${$}` stand for the literal characters. A pattern with a
//! variable the context cannot resolve matches nothing.

use std::collections::HashMap;

use serde_json::Value;

/// Largest document, counted without whitespace, as AWS IoT limits it.
pub const MAX_DOCUMENT_CHARS: usize = 2048;

/// Why a document was rejected; the API answers `MalformedPolicyException`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedPolicy(pub String);

impl std::fmt::Display for MalformedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// One piece of a pattern after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*`: any run of characters.
    Any,
    /// `?`: exactly one character.
    One,
    /// `${name}`: substituted from the context (lowercased name).
    Variable(String),
}

/// A resource, action or condition-value pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    tokens: Vec<Token>,
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, MalformedPolicy> {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if let Some(after) = rest.strip_prefix("${") {
                let Some(end) = after.find('}') else {
                    return Err(MalformedPolicy(format!(
                        "Unterminated policy variable in '{text}'"
                    )));
                };
                let name = &after[..end];
                match name {
                    "*" | "?" | "$" => literal.push_str(name),
                    _ if name.is_empty() => {
                        return Err(MalformedPolicy(format!(
                            "Empty policy variable in '{text}'"
                        )))
                    }
                    _ => {
                        if !literal.is_empty() {
                            tokens.push(Token::Literal(std::mem::take(&mut literal)));
                        }
                        tokens.push(Token::Variable(name.to_ascii_lowercase()));
                    }
                }
                rest = &after[end + 1..];
                continue;
            }
            match c {
                '*' | '?' => {
                    if !literal.is_empty() {
                        tokens.push(Token::Literal(std::mem::take(&mut literal)));
                    }
                    tokens.push(if c == '*' { Token::Any } else { Token::One });
                }
                _ => literal.push(c),
            }
            rest = &rest[c.len_utf8()..];
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Ok(Pattern { tokens })
    }

    /// The pattern with variables replaced, or `None` when one cannot be resolved.
    fn resolve(&self, context: &Context) -> Option<Vec<Token>> {
        let mut out = Vec::with_capacity(self.tokens.len());
        for token in &self.tokens {
            match token {
                Token::Variable(name) => {
                    let value = context.first(name)?;
                    out.push(Token::Literal(value.to_string()));
                }
                other => out.push(other.clone()),
            }
        }
        Some(out)
    }

    fn matches(&self, text: &str, context: &Context, ignore_case: bool) -> bool {
        match self.resolve(context) {
            Some(tokens) => {
                if ignore_case {
                    let lowered: Vec<Token> = tokens
                        .into_iter()
                        .map(|t| match t {
                            Token::Literal(l) => Token::Literal(l.to_lowercase()),
                            t => t,
                        })
                        .collect();
                    wildcard_match(&lowered, &text.to_lowercase())
                } else {
                    wildcard_match(&tokens, text)
                }
            }
            None => false,
        }
    }

    /// The pattern as literal text after substitution, wildcards kept literal (StringEquals).
    fn literal(&self, context: &Context) -> Option<String> {
        let mut out = String::new();
        for token in self.resolve(context)? {
            match token {
                Token::Literal(l) => out.push_str(&l),
                Token::Any => out.push('*'),
                Token::One => out.push('?'),
                Token::Variable(_) => return None,
            }
        }
        Some(out)
    }
}

/// Matches `text` against literal / `*` / `?` tokens (greedy with backtracking, linear space).
fn wildcard_match(tokens: &[Token], text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    // Expand literals into single characters so the classic two-pointer algorithm applies.
    let mut pattern: Vec<Option<char>> = Vec::new(); // None = '*', Some('\0') never used
    let mut singles: Vec<bool> = Vec::new(); // true where the entry is '?'
    for token in tokens {
        match token {
            Token::Literal(l) => {
                for c in l.chars() {
                    pattern.push(Some(c));
                    singles.push(false);
                }
            }
            Token::Any => {
                pattern.push(None);
                singles.push(false);
            }
            Token::One => {
                pattern.push(Some('?'));
                singles.push(true);
            }
            Token::Variable(_) => return false,
        }
    }
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < chars.len() {
        if p < pattern.len() && pattern[p].is_some() && (singles[p] || pattern[p] == Some(chars[t]))
        {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p].is_none() {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p].is_none() {
        p += 1;
    }
    p == pattern.len()
}

/// How a condition compares the context's values with the policy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    Bool,
    Null,
}

impl Operator {
    fn parse(name: &str) -> Option<Operator> {
        Some(match name {
            "StringEquals" => Operator::StringEquals,
            "StringNotEquals" => Operator::StringNotEquals,
            "StringEqualsIgnoreCase" => Operator::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Operator::StringNotEqualsIgnoreCase,
            "StringLike" => Operator::StringLike,
            "StringNotLike" => Operator::StringNotLike,
            "Bool" => Operator::Bool,
            "Null" => Operator::Null,
            _ => return None,
        })
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Operator::StringNotEquals
                | Operator::StringNotEqualsIgnoreCase
                | Operator::StringNotLike
        )
    }

    /// Whether one context value matches one policy value (before negation).
    fn matches_one(self, actual: &str, wanted: &Pattern, context: &Context) -> bool {
        match self {
            Operator::StringEquals | Operator::StringNotEquals | Operator::Bool => {
                wanted.literal(context).is_some_and(|w| {
                    if self == Operator::Bool {
                        w.eq_ignore_ascii_case(actual)
                    } else {
                        w == actual
                    }
                })
            }
            Operator::StringEqualsIgnoreCase | Operator::StringNotEqualsIgnoreCase => wanted
                .literal(context)
                .is_some_and(|w| w.to_lowercase() == actual.to_lowercase()),
            Operator::StringLike | Operator::StringNotLike => {
                wanted.matches(actual, context, false)
            }
            Operator::Null => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetQualifier {
    Single,
    ForAllValues,
    ForAnyValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    qualifier: SetQualifier,
    operator: Operator,
    if_exists: bool,
    key: String,
    values: Vec<Pattern>,
}

impl Condition {
    fn holds(&self, context: &Context) -> bool {
        let actual = context.all(&self.key);
        if self.operator == Operator::Null {
            let want_null = self
                .values
                .iter()
                .any(|v| v.literal(context).is_some_and(|s| s == "true"));
            return actual.is_none() == want_null;
        }
        let any_match = |a: &str| {
            self.values
                .iter()
                .any(|w| self.operator.matches_one(a, w, context))
        };
        match self.qualifier {
            SetQualifier::ForAllValues => {
                // Every value in the request must satisfy the test; an absent key passes.
                actual.is_none_or(|values| {
                    values.iter().all(|a| {
                        let m = any_match(a);
                        if self.operator.negated() {
                            !m
                        } else {
                            m
                        }
                    })
                })
            }
            SetQualifier::ForAnyValue => actual.is_some_and(|values| {
                values.iter().any(|a| {
                    let m = any_match(a);
                    if self.operator.negated() {
                        !m
                    } else {
                        m
                    }
                })
            }),
            SetQualifier::Single => match actual {
                None => self.if_exists || self.operator.negated(),
                Some(values) => {
                    let m = values.iter().any(|a| any_match(a));
                    if self.operator.negated() {
                        !m
                    } else {
                        m
                    }
                }
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    effect: Effect,
    actions: Vec<Pattern>,
    not_action: bool,
    resources: Vec<Pattern>,
    not_resource: bool,
    conditions: Vec<Condition>,
}

impl Statement {
    fn applies(&self, request: &Request<'_>, context: &Context) -> bool {
        let action_hit = self
            .actions
            .iter()
            .any(|a| a.matches(request.action, context, true));
        if action_hit == self.not_action {
            return false;
        }
        let resource_hit = self
            .resources
            .iter()
            .any(|r| r.matches(request.resource, context, false));
        if resource_hit == self.not_resource {
            return false;
        }
        self.conditions.iter().all(|c| c.holds(context))
    }
}

/// A parsed policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    statements: Vec<Statement>,
}

/// One authorization question: an action (`iot:Publish`) on a resource ARN.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub action: &'a str,
    pub resource: &'a str,
}

/// Values of policy variables and condition keys for one client; keys are compared
/// case-insensitively (stored lowercased).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    values: HashMap<String, Vec<String>>,
}

impl Context {
    pub fn new() -> Context {
        Context::default()
    }

    /// Sets a single-valued key.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.values
            .insert(key.to_ascii_lowercase(), vec![value.into()]);
    }

    /// Sets a multi-valued key (`iot:ConnectAttributes`, `.List` variables).
    pub fn set_all(&mut self, key: &str, values: Vec<String>) {
        self.values.insert(key.to_ascii_lowercase(), values);
    }

    pub fn first(&self, key: &str) -> Option<&str> {
        self.values
            .get(&key.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    fn all(&self, key: &str) -> Option<&Vec<String>> {
        self.values.get(&key.to_ascii_lowercase())
    }
}

/// The outcome of evaluating policies for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    ExplicitDeny,
    ImplicitDeny,
}

impl Decision {
    pub fn allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// Evaluates `documents` for `request`: any matching Deny wins, then any matching Allow.
pub fn decide<'d>(
    documents: impl IntoIterator<Item = &'d PolicyDocument>,
    request: &Request<'_>,
    context: &Context,
) -> Decision {
    let mut allowed = false;
    for document in documents {
        for statement in &document.statements {
            if statement.applies(request, context) {
                match statement.effect {
                    Effect::Deny => return Decision::ExplicitDeny,
                    Effect::Allow => allowed = true,
                }
            }
        }
    }
    if allowed {
        Decision::Allow
    } else {
        Decision::ImplicitDeny
    }
}

fn string_or_list(value: &Value, field: &str) -> Result<Vec<String>, MalformedPolicy> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    MalformedPolicy(format!("{field} must be a string or a list of strings"))
                })
            })
            .collect(),
        _ => Err(MalformedPolicy(format!(
            "{field} must be a string or a non-empty list of strings"
        ))),
    }
}

fn parse_condition_block(value: &Value) -> Result<Vec<Condition>, MalformedPolicy> {
    let Value::Object(operators) = value else {
        return Err(MalformedPolicy("Condition must be an object".into()));
    };
    let mut conditions = Vec::new();
    for (name, keys) in operators {
        let (qualifier, base) = if let Some(rest) = name.strip_prefix("ForAllValues:") {
            (SetQualifier::ForAllValues, rest)
        } else if let Some(rest) = name.strip_prefix("ForAnyValue:") {
            (SetQualifier::ForAnyValue, rest)
        } else {
            (SetQualifier::Single, name.as_str())
        };
        let (base, if_exists) = match base.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (base, false),
        };
        let operator = Operator::parse(base)
            .ok_or_else(|| MalformedPolicy(format!("Unsupported condition operator {name}")))?;
        let Value::Object(keys) = keys else {
            return Err(MalformedPolicy(format!(
                "Condition operator {name} must map keys to values"
            )));
        };
        for (key, wanted) in keys {
            let wanted = match wanted {
                Value::Bool(b) => vec![b.to_string()],
                Value::Number(n) => vec![n.to_string()],
                other => string_or_list(other, &format!("Condition {name} {key}"))?,
            };
            conditions.push(Condition {
                qualifier,
                operator,
                if_exists,
                key: key.to_ascii_lowercase(),
                values: wanted
                    .iter()
                    .map(|w| Pattern::parse(w))
                    .collect::<Result<_, _>>()?,
            });
        }
    }
    Ok(conditions)
}

fn parse_statement(value: &Value) -> Result<Statement, MalformedPolicy> {
    let Value::Object(fields) = value else {
        return Err(MalformedPolicy("Each Statement must be an object".into()));
    };
    for key in fields.keys() {
        if !matches!(
            key.as_str(),
            "Sid" | "Effect" | "Action" | "NotAction" | "Resource" | "NotResource" | "Condition"
        ) {
            return Err(MalformedPolicy(format!(
                "Policy statement has an unknown element {key}"
            )));
        }
    }
    if let Some(sid) = fields.get("Sid") {
        if !sid.is_string() {
            return Err(MalformedPolicy("Sid must be a string".into()));
        }
    }
    let effect = match fields.get("Effect").and_then(Value::as_str) {
        Some("Allow") => Effect::Allow,
        Some("Deny") => Effect::Deny,
        Some(other) => {
            return Err(MalformedPolicy(format!(
                "Effect must be Allow or Deny, not {other}"
            )))
        }
        None => return Err(MalformedPolicy("Policy statement is missing Effect".into())),
    };
    let (actions, not_action) = match (fields.get("Action"), fields.get("NotAction")) {
        (Some(a), None) => (string_or_list(a, "Action")?, false),
        (None, Some(a)) => (string_or_list(a, "NotAction")?, true),
        (None, None) => return Err(MalformedPolicy("Policy statement is missing Action".into())),
        _ => {
            return Err(MalformedPolicy(
                "Policy statement has both Action and NotAction".into(),
            ))
        }
    };
    for action in &actions {
        let valid = action == "*"
            || action
                .split_once(':')
                .is_some_and(|(svc, op)| !svc.is_empty() && !op.is_empty() && !op.contains(':'));
        if !valid {
            return Err(MalformedPolicy(format!(
                "Action {action} is not of the form service:operation"
            )));
        }
    }
    let (resources, not_resource) = match (fields.get("Resource"), fields.get("NotResource")) {
        (Some(r), None) => (string_or_list(r, "Resource")?, false),
        (None, Some(r)) => (string_or_list(r, "NotResource")?, true),
        (None, None) => {
            return Err(MalformedPolicy(
                "Policy statement is missing Resource".into(),
            ))
        }
        _ => {
            return Err(MalformedPolicy(
                "Policy statement has both Resource and NotResource".into(),
            ))
        }
    };
    for resource in &resources {
        if resource != "*" && !resource.starts_with("arn:") {
            return Err(MalformedPolicy(format!(
                "Resource {resource} must be an ARN or *"
            )));
        }
    }
    let conditions = match fields.get("Condition") {
        Some(c) => parse_condition_block(c)?,
        None => Vec::new(),
    };
    Ok(Statement {
        effect,
        actions: actions
            .iter()
            .map(|a| Pattern::parse(a))
            .collect::<Result<_, _>>()?,
        not_action,
        resources: resources
            .iter()
            .map(|r| Pattern::parse(r))
            .collect::<Result<_, _>>()?,
        not_resource,
        conditions,
    })
}

impl PolicyDocument {
    /// Parses and validates a document as CreatePolicy does.
    pub fn parse(text: &str) -> Result<PolicyDocument, MalformedPolicy> {
        let significant = text.chars().filter(|c| !c.is_whitespace()).count();
        if significant > MAX_DOCUMENT_CHARS {
            return Err(MalformedPolicy(format!(
                "Policy document is {significant} characters long (without whitespace); the limit is {MAX_DOCUMENT_CHARS}"
            )));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| MalformedPolicy(format!("Policy document is not valid JSON: {e}")))?;
        let Value::Object(top) = &value else {
            return Err(MalformedPolicy(
                "Policy document must be a JSON object".into(),
            ));
        };
        for key in top.keys() {
            if !matches!(key.as_str(), "Version" | "Statement" | "Id") {
                return Err(MalformedPolicy(format!(
                    "Policy document has an unknown element {key}"
                )));
            }
        }
        match top.get("Version") {
            None => {}
            Some(Value::String(v)) if v == "2012-10-17" || v == "2008-10-17" => {}
            Some(other) => {
                return Err(MalformedPolicy(format!(
                    "Unsupported policy version {other}"
                )))
            }
        }
        let statements = match top.get("Statement") {
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(parse_statement)
                .collect::<Result<Vec<_>, _>>()?,
            Some(single @ Value::Object(_)) => vec![parse_statement(single)?],
            _ => {
                return Err(MalformedPolicy(
                    "Policy document must have a non-empty Statement".into(),
                ))
            }
        };
        Ok(PolicyDocument { statements })
    }

    /// Whether the document allows every action on every resource unconditionally and
    /// denies nothing (lets the authorizer skip evaluation for the dev default).
    pub fn allows_everything(&self) -> bool {
        let all = |patterns: &[Pattern]| {
            patterns.iter().any(|p| p.tokens == [Token::Any])
                || patterns
                    .iter()
                    .any(|p| p.tokens == [Token::Literal("iot:".into()), Token::Any])
        };
        self.statements.iter().all(|s| s.effect == Effect::Allow)
            && self.statements.iter().any(|s| {
                !s.not_action
                    && !s.not_resource
                    && s.conditions.is_empty()
                    && all(&s.actions)
                    && s.resources.iter().any(|p| p.tokens == [Token::Any])
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:iot:us-east-1:123456789012";

    fn context(client_id: &str, thing: Option<&str>) -> Context {
        let mut c = Context::new();
        c.set("iot:ClientId", client_id);
        c.set(
            "iot:Connection.Thing.IsAttached",
            if thing.is_some() { "true" } else { "false" },
        );
        if let Some(t) = thing {
            c.set("iot:Connection.Thing.ThingName", t);
            c.set("iot:Connection.Thing.Attributes[floor]", "3");
        }
        c.set("iot:Certificate.Subject.CommonName", "sensor-7");
        c
    }

    fn doc(statements: &str) -> PolicyDocument {
        PolicyDocument::parse(&format!(
            r#"{{"Version":"2012-10-17","Statement":{statements}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn evaluation_table() {
        let connect_own = doc(&format!(
            r#"[{{"Effect":"Allow","Action":"iot:Connect","Resource":"{ARN}:client/${{iot:Connection.Thing.ThingName}}"}}]"#
        ));
        let pub_prefix = doc(&format!(
            r#"[{{"Effect":"Allow","Action":["iot:Publish","iot:Receive"],"Resource":"{ARN}:topic/devices/${{iot:ClientId}}/*"}},
                {{"Effect":"Deny","Action":"iot:Publish","Resource":"{ARN}:topic/devices/*/secret"}}]"#
        ));
        let sub_literal = doc(&format!(
            r#"{{"Effect":"Allow","Action":"iot:Subscribe","Resource":"{ARN}:topicfilter/a/+/c"}}"#
        ));
        let question = doc(&format!(
            r#"{{"Effect":"Allow","Action":"iot:Pub*","Resource":"{ARN}:topic/room?"}}"#
        ));
        let cn = doc(&format!(
            r#"{{"Effect":"Allow","Action":"iot:Publish","Resource":"{ARN}:topic/cn/${{iot:Certificate.Subject.CommonName}}"}}"#
        ));
        let attached_only = doc(
            r#"{"Effect":"Allow","Action":"iot:Connect","Resource":"*","Condition":{"Bool":{"iot:Connection.Thing.IsAttached":"true"}}}"#,
        );
        let escapes = doc(&format!(
            r#"{{"Effect":"Allow","Action":"iot:Publish","Resource":"{ARN}:topic/lit/${{*}}"}}"#
        ));
        let no_persistent = doc(
            r#"[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"},
                {"Effect":"Deny","Action":"iot:Connect","Resource":"*","Condition":{"ForAnyValue:StringEquals":{"iot:ConnectAttributes":["PersistentConnect"]}}}]"#,
        );
        let attr = doc(&format!(
            r#"{{"Effect":"Allow","Action":"iot:Publish","Resource":"{ARN}:topic/floor/${{iot:Connection.Thing.Attributes[floor]}}"}}"#
        ));

        let thing = context("dev-1", Some("dev-1"));
        let lone = context("dev-1", None);
        let star_client = context("*", None);
        let mut persistent = context("p", None);
        persistent.set_all("iot:ConnectAttributes", vec!["PersistentConnect".into()]);
        let mut clean = context("p", None);
        clean.set_all("iot:ConnectAttributes", vec![]);

        let topic = |t: &str| format!("{ARN}:topic/{t}");
        let cases: Vec<(&PolicyDocument, &str, String, &Context, Decision)> = vec![
            (
                &connect_own,
                "iot:Connect",
                format!("{ARN}:client/dev-1"),
                &thing,
                Decision::Allow,
            ),
            (
                &connect_own,
                "iot:Connect",
                format!("{ARN}:client/dev-2"),
                &thing,
                Decision::ImplicitDeny,
            ),
            // unresolved thing variable: the statement matches nothing
            (
                &connect_own,
                "iot:Connect",
                format!("{ARN}:client/dev-1"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &pub_prefix,
                "iot:Publish",
                topic("devices/dev-1/temp"),
                &lone,
                Decision::Allow,
            ),
            (
                &pub_prefix,
                "iot:Publish",
                topic("devices/dev-1/a/b/c"),
                &lone,
                Decision::Allow,
            ),
            (
                &pub_prefix,
                "iot:Receive",
                topic("devices/dev-1/x"),
                &lone,
                Decision::Allow,
            ),
            (
                &pub_prefix,
                "iot:Publish",
                topic("devices/dev-2/temp"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &pub_prefix,
                "iot:Publish",
                topic("devices/dev-1/secret"),
                &lone,
                Decision::ExplicitDeny,
            ),
            (
                &pub_prefix,
                "iot:Subscribe",
                format!("{ARN}:topicfilter/devices/dev-1/x"),
                &lone,
                Decision::ImplicitDeny,
            ),
            // a client id of '*' is substituted literally, never as a wildcard
            (
                &pub_prefix,
                "iot:Publish",
                topic("devices/other/t"),
                &star_client,
                Decision::ImplicitDeny,
            ),
            (
                &pub_prefix,
                "iot:Publish",
                topic("devices/*/t"),
                &star_client,
                Decision::Allow,
            ),
            // '+' is literal in policies
            (
                &sub_literal,
                "iot:Subscribe",
                format!("{ARN}:topicfilter/a/+/c"),
                &lone,
                Decision::Allow,
            ),
            (
                &sub_literal,
                "iot:Subscribe",
                format!("{ARN}:topicfilter/a/b/c"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &question,
                "iot:Publish",
                topic("room1"),
                &lone,
                Decision::Allow,
            ),
            (
                &question,
                "iot:publish",
                topic("room1"),
                &lone,
                Decision::Allow,
            ),
            (
                &question,
                "iot:Publish",
                topic("room12"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &question,
                "iot:Publish",
                topic("room"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &cn,
                "iot:Publish",
                topic("cn/sensor-7"),
                &lone,
                Decision::Allow,
            ),
            (
                &cn,
                "iot:Publish",
                topic("cn/sensor-8"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &attached_only,
                "iot:Connect",
                format!("{ARN}:client/x"),
                &thing,
                Decision::Allow,
            ),
            (
                &attached_only,
                "iot:Connect",
                format!("{ARN}:client/x"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &escapes,
                "iot:Publish",
                topic("lit/*"),
                &lone,
                Decision::Allow,
            ),
            (
                &escapes,
                "iot:Publish",
                topic("lit/x"),
                &lone,
                Decision::ImplicitDeny,
            ),
            (
                &no_persistent,
                "iot:Connect",
                format!("{ARN}:client/p"),
                &persistent,
                Decision::ExplicitDeny,
            ),
            (
                &no_persistent,
                "iot:Connect",
                format!("{ARN}:client/p"),
                &clean,
                Decision::Allow,
            ),
            (
                &attr,
                "iot:Publish",
                topic("floor/3"),
                &thing,
                Decision::Allow,
            ),
            (
                &attr,
                "iot:Publish",
                topic("floor/3"),
                &lone,
                Decision::ImplicitDeny,
            ),
        ];
        for (i, (document, action, resource, ctx, want)) in cases.into_iter().enumerate() {
            let got = decide(
                [document],
                &Request {
                    action,
                    resource: &resource,
                },
                ctx,
            );
            assert_eq!(got, want, "case {i}: {action} {resource}");
        }
        // Deny in one document beats Allow in another.
        let allow_all = doc(r#"{"Effect":"Allow","Action":"iot:*","Resource":"*"}"#);
        assert!(allow_all.allows_everything());
        assert!(!pub_prefix.allows_everything());
        assert_eq!(
            decide(
                [&allow_all, &pub_prefix],
                &Request {
                    action: "iot:Publish",
                    resource: &topic("devices/x/secret")
                },
                &lone
            ),
            Decision::ExplicitDeny
        );
    }

    #[test]
    fn malformed_documents_are_rejected() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"Version":"2012-10-17"}"#,
            r#"{"Version":"2012-10-17","Statement":[]}"#,
            r#"{"Version":"1999-01-01","Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Maybe","Action":"iot:*","Resource":"*"}}"#,
            r#"{"Statement":{"Action":"iot:*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"iot:*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"publish","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"iot:*","Resource":"topic/x"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","Extra":1}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"iot:*","Resource":"arn:${iot:ClientId"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"iot:*","Resource":"*","Condition":{"Fancy":{"a":"b"}}}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":[],"Resource":"*"}}"#,
        ] {
            assert!(PolicyDocument::parse(bad).is_err(), "accepted {bad:?}");
        }
        let long = format!(
            r#"{{"Statement":{{"Effect":"Allow","Action":"iot:*","Resource":"arn:{}"}}}}"#,
            "x".repeat(MAX_DOCUMENT_CHARS)
        );
        assert!(PolicyDocument::parse(&long).is_err());
    }

    /// Deterministic random inputs: the parser and evaluator never panic.
    #[test]
    fn random_documents_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pieces = [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"Statement\"",
            "\"Effect\"",
            "\"Allow\"",
            "\"Deny\"",
            "\"Action\"",
            "\"iot:*\"",
            "\"Resource\"",
            "\"arn:${iot:ClientId}/*\"",
            "\"*\"",
            "\"Condition\"",
            "\"StringLike\"",
            "\"${\"",
            "\"?\"",
            "\"Version\"",
            "\"2012-10-17\"",
            "\"ForAllValues:StringEquals\"",
            "\"k\"",
            "1",
            "true",
            "null",
        ];
        let ctx = context("c", Some("c"));
        for _ in 0..5000 {
            let n = rng.gen_range(0..30);
            let text: String = (0..n)
                .map(|_| pieces[rng.gen_range(0..pieces.len())])
                .collect();
            if let Ok(d) = PolicyDocument::parse(&text) {
                let _ = decide(
                    [&d],
                    &Request {
                        action: "iot:Publish",
                        resource: "arn:aws:iot:r:a:topic/c/x",
                    },
                    &ctx,
                );
            }
        }
    }
}
