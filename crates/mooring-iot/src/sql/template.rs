//! Substitution templates: `${expression}` inside rule action fields.
//!
//! A template is parsed when the rule is created (so a bad expression is refused then) and
//! rendered per message against the original payload and topic, with the statement's SET
//! variables visible. `$$` stands for a literal `$` (AWS requires it at the start of a
//! republish topic such as `$$aws/things/x/shadow/update`). Strings are inserted without
//! quotes, other values as JSON, Undefined as nothing.

use super::ast::Expr;
use super::eval::{evaluate_expression, ExternalFunctions, MessageFacts};
use super::value::Value;
use super::{parser, ParseError, SqlVersion};

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Expr(Expr),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    version: SqlVersion,
}

impl Template {
    /// Parses `text`; errors carry the offset within `text`.
    pub fn parse(text: &str, version: SqlVersion) -> Result<Template, ParseError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'$') {
                literal.push('$');
                i += 2;
                continue;
            }
            if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'{') {
                let start = i + 2;
                let end = find_closing_brace(text, start).ok_or_else(|| {
                    ParseError::at(
                        text,
                        i,
                        "'}' closing the substitution template",
                        "end of input".into(),
                    )
                })?;
                let inner = &text[start..end];
                let expr = parser::parse_expression(inner, version).map_err(|e| {
                    ParseError::at(text, start + e.offset, &e.expected, e.found.clone())
                })?;
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Expr(expr));
                i = end + 1;
                continue;
            }
            let c = text[i..].chars().next().unwrap_or('\0');
            literal.push(c);
            i += c.len_utf8().max(1);
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts, version })
    }

    /// Whether the template contains any `${...}`.
    pub fn is_dynamic(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Expr(_)))
    }

    pub fn render(
        &self,
        facts: &MessageFacts,
        variables: &[(String, Value)],
        external: &dyn ExternalFunctions,
    ) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Expr(e) => out.push_str(
                    &evaluate_expression(e, facts, self.version, variables, external)
                        .to_template_text(),
                ),
            }
        }
        out
    }
}

/// The index of the `}` closing a template opened just before `start`, skipping quoted
/// strings and nested braces.
fn find_closing_brace(text: &str, start: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut i = start;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'{' => depth += 1,
                b'}' if depth == 0 => return Some(i),
                b'}' => depth -= 1,
                _ => {}
            },
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::NoExternalFunctions;

    fn render(template: &str, topic: &str, payload: &str) -> String {
        let facts = MessageFacts::new(topic, payload.as_bytes().to_vec());
        Template::parse(template, SqlVersion::DEFAULT)
            .unwrap()
            .render(&facts, &[], &NoExternalFunctions)
    }

    #[test]
    fn renders_expressions_against_the_original_message() {
        assert_eq!(render("${topic()}/republish", "a/b", "{}"), "a/b/republish");
        assert_eq!(
            render(
                "${replace(topic(), '/', '-') + '-' + n}",
                "a/b",
                r#"{"n":7}"#
            ),
            "a-b-7"
        );
        assert_eq!(
            render("$$aws/things/${id}/shadow", "t", r#"{"id":"x"}"#),
            "$aws/things/x/shadow"
        );
        assert_eq!(render("v=${missing}!", "t", "{}"), "v=!");
        assert_eq!(render("${ {'a': '}'}.a }", "t", "{}"), "}");
        assert_eq!(
            render("${obj}", "t", r#"{"obj":{"k":[1,2]}}"#),
            r#"{"k":[1,2]}"#
        );
        assert_eq!(render("no templates", "t", "{}"), "no templates");
    }

    #[test]
    fn refuses_bad_templates_with_positions() {
        let err = Template::parse("a/${topic(}", SqlVersion::DEFAULT).unwrap_err();
        assert_eq!(err.offset, 10);
        let err = Template::parse("a/${topic()", SqlVersion::DEFAULT).unwrap_err();
        assert_eq!(err.offset, 2);
    }
}
