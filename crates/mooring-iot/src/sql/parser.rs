//! A recursive-descent parser for IoT SQL statements and expressions.
//!
//! Operator precedence, loosest first: `OR`; `AND`; `NOT`; comparisons (`=`, `<>`, `!=`,
//! `<`, `<=`, `>`, `>=`, `IN`, `IS [NOT] NULL|UNDEFINED`); `+` and `-`; `*`, `/` and `%`;
//! unary minus; member access `.name` and indexing `[expr]`. AWS documents no precedence,
//! so this is standard SQL's. Every error names what was expected, what was found and where
//! (line and 0-based column, as AWS's ANTLR-generated messages do). Features that need SQL
//! version 2016-03-23 (array and object literals, nested object queries, the 2016-only
//! functions and cast types) are refused under 2015-10-08.

use std::sync::Arc;

use super::ast::*;
use super::functions::{self, FunctionKind};
use super::lexer::{tokenize, Spanned, Token};
use super::value::Value;
use super::{ParseError, SqlVersion};

/// Parses a full statement.
pub fn parse_statement(text: &str, version: SqlVersion) -> Result<Statement, ParseError> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        text,
        tokens,
        pos: 0,
        version,
        depth: 0,
    };
    let statement = parser.statement()?;
    parser.expect_eof()?;
    Ok(statement)
}

/// Parses a lone expression (the inside of a `${...}` substitution template).
pub fn parse_expression(text: &str, version: SqlVersion) -> Result<Expr, ParseError> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        text,
        tokens,
        pos: 0,
        version,
        depth: 0,
    };
    let expr = parser.expr()?;
    parser.expect_eof()?;
    Ok(expr)
}

/// How deeply expressions may nest before the parser refuses (protects the stack).
const MAX_DEPTH: usize = 40;

struct Parser<'t> {
    text: &'t str,
    tokens: Vec<Spanned>,
    pos: usize,
    version: SqlVersion,
    depth: usize,
}

impl<'t> Parser<'t> {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos].token
    }

    fn peek_at(&self, n: usize) -> &Token {
        let i = (self.pos + n).min(self.tokens.len() - 1);
        &self.tokens[i].token
    }

    fn offset(&self) -> usize {
        self.tokens[self.pos].offset
    }

    fn advance(&mut self) -> Token {
        let token = self.tokens[self.pos].token.clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        token
    }

    fn error(&self, expected: &str) -> ParseError {
        ParseError::at(self.text, self.offset(), expected, self.peek().describe())
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Token::Ident(s) if s.eq_ignore_ascii_case(keyword))
    }

    fn is_keyword_at(&self, n: usize, keyword: &str) -> bool {
        matches!(self.peek_at(n), Token::Ident(s) if s.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        if self.is_keyword(keyword) {
            self.advance();
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), ParseError> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            Err(self.error(keyword))
        }
    }

    fn eat(&mut self, token: &Token) -> bool {
        if self.peek() == token {
            self.advance();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &Token, what: &str) -> Result<(), ParseError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    fn expect_eof(&self) -> Result<(), ParseError> {
        if *self.peek() == Token::Eof {
            Ok(())
        } else {
            Err(self.error("end of input"))
        }
    }

    fn require_2016(&self, feature: &str, at: usize) -> Result<(), ParseError> {
        if self.version == SqlVersion::V2015_10_08 {
            return Err(ParseError::at(
                self.text,
                at,
                &format!("{feature} only with awsIotSqlVersion 2016-03-23 or later"),
                format!("{feature} under 2015-10-08"),
            ));
        }
        Ok(())
    }

    fn statement(&mut self) -> Result<Statement, ParseError> {
        let mut set = Vec::new();
        if self.eat_keyword("SET") {
            loop {
                let name = match self.advance() {
                    Token::Variable(name) => name,
                    _ => {
                        self.pos -= 1;
                        return Err(self.error("a variable such as @name"));
                    }
                };
                if set.iter().any(|(n, _): &(String, Expr)| *n == name) {
                    self.pos -= 1;
                    return Err(self.error("a variable that is not already set"));
                }
                self.expect(&Token::Eq, "'='")?;
                let value = self.expr()?;
                set.push((name, value));
                if !self.eat(&Token::Comma) {
                    break;
                }
            }
        }
        self.expect_keyword("SELECT")?;
        let (value, items) = self.select_list()?;
        let mut from = None;
        if self.eat_keyword("FROM") {
            let at = self.offset();
            match self.advance() {
                Token::Str(topic) => {
                    if let Err(problem) = crate::topic::validate_filter(&topic) {
                        return Err(ParseError::at(
                            self.text,
                            at,
                            "a valid topic filter",
                            format!("'{topic}' ({problem})"),
                        ));
                    }
                    from = Some(topic);
                }
                _ => {
                    self.pos -= 1;
                    return Err(self.error("a quoted topic filter such as 'sensors/+/data'"));
                }
            }
        }
        let condition = if self.eat_keyword("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        if *self.peek() != Token::Eof {
            let expected = match (&from, &condition) {
                (None, None) => "FROM, WHERE or end of input",
                (Some(_), None) => "WHERE or end of input",
                _ => "end of input",
            };
            return Err(self.error(expected));
        }
        Ok(Statement {
            version: self.version,
            set,
            select: Select {
                value,
                items,
                source: None,
                condition,
            },
            from,
        })
    }

    /// `[VALUE] item, item ...`
    fn select_list(&mut self) -> Result<(bool, Vec<SelectItem>), ParseError> {
        // `VALUE` is a keyword only when an expression follows it; `SELECT value FROM ...`
        // selects an attribute called `value`.
        let value = self.is_keyword("VALUE")
            && !matches!(
                self.peek_at(1),
                Token::Comma | Token::Eof | Token::Dot | Token::RParen
            )
            && !self.is_keyword_at(1, "FROM")
            && !self.is_keyword_at(1, "AS")
            && !self.is_keyword_at(1, "WHERE");
        if value {
            self.advance();
            let expr = self.expr()?;
            return Ok((true, vec![SelectItem::Expr { expr, alias: None }]));
        }
        let mut items = Vec::new();
        loop {
            if *self.peek() == Token::Star
                && matches!(self.peek_at(1), Token::Comma | Token::Eof | Token::RParen)
                || *self.peek() == Token::Star
                    && (self.is_keyword_at(1, "FROM") || self.is_keyword_at(1, "WHERE"))
            {
                self.advance();
                items.push(SelectItem::Star);
            } else {
                if matches!(self.peek(), Token::Eof) || self.is_keyword("FROM") {
                    return Err(self.error("an expression or '*' to select"));
                }
                let expr = self.expr()?;
                let alias = if self.eat_keyword("AS") {
                    Some(self.alias_path()?)
                } else {
                    None
                };
                items.push(SelectItem::Expr { expr, alias });
            }
            if !self.eat(&Token::Comma) {
                break;
            }
        }
        Ok((false, items))
    }

    fn alias_path(&mut self) -> Result<Vec<String>, ParseError> {
        let mut path = vec![self.alias_segment()?];
        while self.eat(&Token::Dot) {
            path.push(self.alias_segment()?);
        }
        Ok(path)
    }

    fn alias_segment(&mut self) -> Result<String, ParseError> {
        match self.advance() {
            Token::Ident(name) | Token::Str(name) => Ok(name),
            _ => {
                self.pos -= 1;
                Err(self.error("an alias name"))
            }
        }
    }

    fn expr(&mut self) -> Result<Expr, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error("a less deeply nested expression"));
        }
        let result = self.or_expr();
        self.depth -= 1;
        result
    }

    fn or_expr(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.and_expr()?;
        while self.eat_keyword("OR") {
            let right = self.and_expr()?;
            left = Expr::Binary(BinaryOp::Or, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.not_expr()?;
        while self.eat_keyword("AND") {
            let right = self.not_expr()?;
            left = Expr::Binary(BinaryOp::And, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not_expr(&mut self) -> Result<Expr, ParseError> {
        if self.eat_keyword("NOT") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(self.error("a less deeply nested expression"));
            }
            let inner = self.not_expr();
            self.depth -= 1;
            return Ok(Expr::Unary(UnaryOp::Not, Box::new(inner?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.additive()?;
        let op = match self.peek() {
            Token::Eq => Some(BinaryOp::Eq),
            Token::NotEq => Some(BinaryOp::NotEq),
            Token::Lt => Some(BinaryOp::Lt),
            Token::LtEq => Some(BinaryOp::LtEq),
            Token::Gt => Some(BinaryOp::Gt),
            Token::GtEq => Some(BinaryOp::GtEq),
            Token::Ident(s) if s.eq_ignore_ascii_case("IN") => Some(BinaryOp::In),
            _ => None,
        };
        if let Some(op) = op {
            self.advance();
            let right = self.additive()?;
            return Ok(Expr::Binary(op, Box::new(left), Box::new(right)));
        }
        if self.eat_keyword("IS") {
            let negated = self.eat_keyword("NOT");
            let undefined = if self.eat_keyword("NULL") {
                false
            } else if self.eat_keyword("UNDEFINED") {
                true
            } else {
                return Err(self.error("NULL or UNDEFINED"));
            };
            return Ok(Expr::Is {
                expr: Box::new(left),
                negated,
                undefined,
            });
        }
        Ok(left)
    }

    fn additive(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Token::Plus => BinaryOp::Add,
                Token::Minus => BinaryOp::Sub,
                _ => return Ok(left),
            };
            self.advance();
            let right = self.multiplicative()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.unary()?;
        loop {
            let op = match self.peek() {
                Token::Star => BinaryOp::Mul,
                Token::Slash => BinaryOp::Div,
                Token::Percent => BinaryOp::Mod,
                _ => return Ok(left),
            };
            self.advance();
            let right = self.unary()?;
            left = Expr::Binary(op, Box::new(left), Box::new(right));
        }
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self.eat(&Token::Minus) {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(self.error("a less deeply nested expression"));
            }
            let inner = self.unary();
            self.depth -= 1;
            return Ok(match inner? {
                Expr::Literal(Value::Int(i)) => Expr::Literal(
                    i.checked_neg()
                        .map(Value::Int)
                        .unwrap_or(Value::Decimal(-(i as f64))),
                ),
                Expr::Literal(Value::Decimal(d)) => Expr::Literal(Value::Decimal(-d)),
                other => Expr::Unary(UnaryOp::Neg, Box::new(other)),
            });
        }
        if self.eat(&Token::Plus) {
            return self.unary();
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.primary()?;
        loop {
            if self.eat(&Token::Dot) {
                match self.advance() {
                    Token::Ident(name) => expr = Expr::Member(Box::new(expr), name),
                    Token::Int(i) => expr = Expr::Member(Box::new(expr), i.to_string()),
                    _ => {
                        self.pos -= 1;
                        return Err(self.error("an attribute name after '.'"));
                    }
                }
            } else if self.eat(&Token::LBracket) {
                let index = self.expr()?;
                self.expect(&Token::RBracket, "']'")?;
                expr = Expr::Index(Box::new(expr), Box::new(index));
            } else {
                return Ok(expr);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let at = self.offset();
        match self.peek().clone() {
            Token::Int(i) => {
                self.advance();
                Ok(Expr::Literal(Value::Int(i)))
            }
            Token::Decimal(d) => {
                self.advance();
                let mut value = Value::Decimal(d);
                if self.version.whole_decimals_are_ints() {
                    value.normalize_whole_decimals();
                }
                Ok(Expr::Literal(value))
            }
            Token::Str(s) => {
                self.advance();
                Ok(Expr::Literal(Value::String(s)))
            }
            Token::Variable(name) => {
                self.advance();
                Ok(Expr::Variable(name))
            }
            Token::Star => {
                self.advance();
                Ok(Expr::Payload)
            }
            Token::LParen => {
                self.advance();
                if self.is_keyword("SELECT") {
                    self.require_2016("nested object queries", at)?;
                    self.advance();
                    let select = self.nested_select()?;
                    self.expect(&Token::RParen, "')' closing the nested query")?;
                    return Ok(Expr::Subquery(Box::new(select)));
                }
                let inner = self.expr()?;
                self.expect(&Token::RParen, "')'")?;
                Ok(inner)
            }
            Token::LBracket => {
                self.require_2016("array literals", at)?;
                self.advance();
                let mut items = Vec::new();
                if !self.eat(&Token::RBracket) {
                    loop {
                        items.push(self.expr()?);
                        if self.eat(&Token::RBracket) {
                            break;
                        }
                        self.expect(&Token::Comma, "',' or ']'")?;
                    }
                }
                Ok(Expr::Array(items))
            }
            Token::LBrace => {
                self.require_2016("object literals", at)?;
                self.advance();
                let mut members = Vec::new();
                if !self.eat(&Token::RBrace) {
                    loop {
                        let key = match self.advance() {
                            Token::Str(k) | Token::Ident(k) => k,
                            _ => {
                                self.pos -= 1;
                                return Err(self.error("an object key"));
                            }
                        };
                        self.expect(&Token::Colon, "':'")?;
                        let value = self.expr()?;
                        members.push((key, value));
                        if self.eat(&Token::RBrace) {
                            break;
                        }
                        self.expect(&Token::Comma, "',' or '}'")?;
                    }
                }
                Ok(Expr::Object(members))
            }
            Token::Ident(name) => self.identifier(name, at),
            _ => Err(self.error("an expression")),
        }
    }

    fn identifier(&mut self, name: String, at: usize) -> Result<Expr, ParseError> {
        let upper = name.to_ascii_uppercase();
        let is_call = *self.peek_at(1) == Token::LParen;
        match upper.as_str() {
            "TRUE" if !is_call => {
                self.advance();
                return Ok(Expr::Literal(Value::Bool(true)));
            }
            "FALSE" if !is_call => {
                self.advance();
                return Ok(Expr::Literal(Value::Bool(false)));
            }
            "NULL" if !is_call => {
                self.advance();
                return Ok(Expr::Literal(Value::Null));
            }
            "CASE" => {
                self.advance();
                return self.case(at);
            }
            "SELECT" | "FROM" | "WHERE" | "AS" | "AND" | "OR" | "WHEN" | "THEN" | "ELSE"
            | "END" => {
                return Err(self.error("an expression"));
            }
            _ => {}
        }
        self.advance();
        if !is_call {
            return Ok(Expr::Attribute(name));
        }
        self.advance(); // (
        let lower = name.to_ascii_lowercase();
        if lower == "cast" {
            let value = self.expr()?;
            self.expect_keyword("AS")?;
            let type_at = self.offset();
            let type_name = match self.advance() {
                Token::Ident(t) => t,
                _ => {
                    self.pos -= 1;
                    return Err(self.error("a type name (String, Int, Decimal, Boolean, ...)"));
                }
            };
            let cast_type = match type_name.to_ascii_lowercase().as_str() {
                "string" | "nvarchar" | "text" | "ntext" | "varchar" => CastType::String,
                "int" | "integer" => CastType::Int,
                "double" => CastType::Decimal,
                "decimal" => {
                    self.require_2016("cast to Decimal", type_at)?;
                    CastType::Decimal
                }
                "bool" | "boolean" => {
                    self.require_2016("cast to Boolean", type_at)?;
                    CastType::Boolean
                }
                _ => {
                    return Err(ParseError::at(
                        self.text,
                        type_at,
                        "a type name (String, Int, Decimal, Boolean, ...)",
                        format!("'{type_name}'"),
                    ))
                }
            };
            self.expect(&Token::RParen, "')'")?;
            return Ok(Expr::Cast(Box::new(value), cast_type));
        }
        let Some(signature) = functions::signature(&lower) else {
            return Err(ParseError::at(
                self.text,
                at,
                "a known function",
                format!("unknown function '{name}'"),
            ));
        };
        if signature.since_2016 {
            self.require_2016(&format!("function {lower}()"), at)?;
        }
        if signature.kind == FunctionKind::Cloud {
            return Err(ParseError::at(
                self.text,
                at,
                "a function Mooring can evaluate locally",
                format!("'{lower}', which needs an AWS service Mooring does not provide"),
            ));
        }
        let mut args = Vec::new();
        if !self.eat(&Token::RParen) {
            loop {
                args.push(self.expr()?);
                if self.eat(&Token::RParen) {
                    break;
                }
                self.expect(&Token::Comma, "',' or ')'")?;
            }
        }
        if args.len() < signature.min_args || args.len() > signature.max_args {
            let wanted = if signature.min_args == signature.max_args {
                signature.min_args.to_string()
            } else if signature.max_args == usize::MAX {
                format!("at least {}", signature.min_args)
            } else {
                format!("{} to {}", signature.min_args, signature.max_args)
            };
            return Err(ParseError::at(
                self.text,
                at,
                &format!("{wanted} argument(s) for {lower}()"),
                format!("{} argument(s)", args.len()),
            ));
        }
        let regex = match (lower.as_str(), args.get(1)) {
            ("regexp_matches" | "regexp_replace" | "regexp_substr", Some(pattern)) => match pattern
            {
                Expr::Literal(Value::String(p)) => match regex::Regex::new(p) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) => {
                        return Err(ParseError::at(
                            self.text,
                            at,
                            "a valid regular expression",
                            format!("'{p}' ({e})"),
                        ))
                    }
                },
                _ => None,
            },
            _ => None,
        };
        Ok(Expr::Call(Box::new(Call {
            name: lower,
            args,
            regex,
        })))
    }

    fn case(&mut self, _at: usize) -> Result<Expr, ParseError> {
        let operand = if self.is_keyword("WHEN") {
            None
        } else {
            Some(Box::new(self.expr()?))
        };
        let mut whens = Vec::new();
        while self.eat_keyword("WHEN") {
            let test = self.expr()?;
            self.expect_keyword("THEN")?;
            let result = self.expr()?;
            whens.push((test, result));
        }
        if whens.is_empty() {
            return Err(self.error("WHEN"));
        }
        let otherwise = if self.eat_keyword("ELSE") {
            Some(Box::new(self.expr()?))
        } else {
            None
        };
        if !self.eat_keyword("END") {
            return Err(self.error(if otherwise.is_some() {
                "END"
            } else {
                "WHEN, ELSE or END"
            }));
        }
        Ok(Expr::Case {
            operand,
            whens,
            otherwise,
        })
    }

    /// The inside of `( SELECT ... FROM attr [WHERE ...] )`, after `SELECT`.
    fn nested_select(&mut self) -> Result<Select, ParseError> {
        let (value, items) = self.select_list()?;
        self.expect_keyword("FROM")?;
        let source = self.postfix()?;
        if matches!(source, Expr::Literal(_)) {
            return Err(self.error("an array attribute after FROM"));
        }
        let condition = if self.eat_keyword("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        Ok(Select {
            value,
            items,
            source: Some(Box::new(source)),
            condition,
        })
    }
}
