//! The syntax tree of an IoT SQL statement, as the parser builds it and the evaluator walks it.

use std::sync::Arc;

use super::value::Value;
use super::SqlVersion;

/// A whole rule statement: `[SET ...] SELECT ... [FROM '...'] [WHERE ...]`.
#[derive(Debug, Clone)]
pub struct Statement {
    pub version: SqlVersion,
    pub set: Vec<(String, Expr)>,
    pub select: Select,
    /// The FROM topic filter; absent for rules used only through Basic Ingest.
    pub from: Option<String>,
}

/// A SELECT: the top-level one or a nested object query.
#[derive(Debug, Clone)]
pub struct Select {
    /// `SELECT VALUE expr`: the output is the bare value.
    pub value: bool,
    pub items: Vec<SelectItem>,
    /// For nested object queries, the array attribute the query ranges over.
    pub source: Option<Box<Expr>>,
    pub condition: Option<Expr>,
}

#[derive(Debug, Clone)]
pub enum SelectItem {
    /// `*`: every member of the payload (or the raw payload when it is not JSON).
    Star,
    Expr {
        expr: Expr,
        /// `AS a.b.c`: the output key path.
        alias: Option<Vec<String>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Or,
    And,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    In,
}

/// The target type of `cast(x AS type)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CastType {
    String,
    Int,
    Decimal,
    Boolean,
}

#[derive(Debug, Clone)]
pub enum Expr {
    Literal(Value),
    /// `*` in expression position: the whole payload.
    Payload,
    /// A top-level attribute of the current document.
    Attribute(String),
    /// `@name`.
    Variable(String),
    Member(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call(Box<Call>),
    Cast(Box<Expr>, CastType),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `x IS [NOT] NULL` / `x IS [NOT] UNDEFINED`.
    Is {
        expr: Box<Expr>,
        negated: bool,
        undefined: bool,
    },
    Case {
        operand: Option<Box<Expr>>,
        whens: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    Array(Vec<Expr>),
    Object(Vec<(String, Expr)>),
    Subquery(Box<Select>),
}

/// A function call; `regex` holds the compiled pattern when the pattern argument is a
/// literal, so it is compiled once at rule creation.
#[derive(Debug, Clone)]
pub struct Call {
    pub name: String,
    pub args: Vec<Expr>,
    pub regex: Option<Arc<regex::Regex>>,
}
