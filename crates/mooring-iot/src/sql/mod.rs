//! AWS IoT SQL: the language of topic rules, parsed and evaluated by hand.
//!
//! [`parse`] turns rule text into a [`Statement`] for one SQL version (`2016-03-23`, the
//! default, or `2015-10-08`), reporting the first error with its position and what was
//! expected; [`eval::evaluate`] runs a statement against one message and answers the
//! outgoing payload, or nothing when the WHERE clause is not true. Values follow AWS's type
//! system with Undefined ([`value`]); the built-in functions live in [`functions`], the
//! Joda-Time and `java.time` patterns of `parse_time`/`time_to_epoch` in [`time_pattern`],
//! and `${...}` substitution templates of rule actions in [`template`].

pub mod ast;
pub mod eval;
pub mod functions;
pub mod lexer;
pub mod parser;
pub mod template;
pub mod time_pattern;
pub mod value;

pub use ast::Statement;
pub use eval::{evaluate, EvalOutcome, ExternalFunctions, MessageFacts, NoExternalFunctions};
pub use value::Value;

/// The rules-engine SQL versions Mooring implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SqlVersion {
    V2015_10_08,
    V2016_03_23,
}

impl SqlVersion {
    pub const DEFAULT: SqlVersion = SqlVersion::V2016_03_23;

    /// Parses an `awsIotSqlVersion` value; `beta` runs as the newest version.
    pub fn parse(text: &str) -> Option<SqlVersion> {
        match text {
            "2015-10-08" => Some(SqlVersion::V2015_10_08),
            "2016-03-23" | "beta" => Some(SqlVersion::V2016_03_23),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SqlVersion::V2015_10_08 => "2015-10-08",
            SqlVersion::V2016_03_23 => "2016-03-23",
        }
    }

    /// Whether numbers such as `10.0` read as Int (2016-03-23) or stay Decimal (2015-10-08).
    pub fn whole_decimals_are_ints(self) -> bool {
        self == SqlVersion::V2016_03_23
    }
}

/// Where parsing stopped and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Byte offset into the SQL text.
    pub offset: usize,
    /// 1-based line.
    pub line: usize,
    /// 0-based column (in characters) within the line.
    pub column: usize,
    pub expected: String,
    pub found: String,
}

impl ParseError {
    pub fn at(text: &str, offset: usize, expected: &str, found: String) -> ParseError {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count();
        ParseError {
            offset,
            line,
            column,
            expected: expected.to_string(),
            found,
        }
    }

    /// The message AWS-style: `Line 1:15 expected FROM but found 'x'`.
    pub fn message(&self) -> String {
        format!(
            "Line {}:{} expected {} but found {}",
            self.line, self.column, self.expected, self.found
        )
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for ParseError {}

/// Parses a rule's SQL text under `version`.
pub fn parse(text: &str, version: SqlVersion) -> Result<Statement, ParseError> {
    parser::parse_statement(text, version)
}
