//! The IoT SQL parser's error reporting, and a deterministic random-input test: token soup
//! and byte noise must never panic and must fail with a position inside the input, and
//! randomly generated well-formed statements must parse and evaluate without panicking.

use mooring_iot::sql::{self, MessageFacts, NoExternalFunctions, SqlVersion};

fn error(sql: &str) -> String {
    sql::parse(sql, SqlVersion::DEFAULT)
        .expect_err(sql)
        .message()
}

#[test]
fn errors_say_where_and_what_was_expected() {
    assert_eq!(
        error("SELECT * FORM 'a'"),
        "Line 1:9 expected FROM, WHERE or end of input but found 'FORM'"
    );
    assert_eq!(
        error("SELECT FROM 'a'"),
        "Line 1:7 expected an expression or '*' to select but found 'FROM'"
    );
    assert_eq!(
        error("SELECT a FROM b"),
        "Line 1:14 expected a quoted topic filter such as 'sensors/+/data' but found 'b'"
    );
    assert_eq!(
        error("SELECT a FROM 'x/#/y'"),
        "Line 1:14 expected a valid topic filter but found 'x/#/y' ('#' must be alone in the last level)"
    );
    assert_eq!(
        error("SELECT a FROM 'x'\nWHERE (b > 1"),
        "Line 2:12 expected ')' but found end of input"
    );
    assert_eq!(
        error("SELECT foo(1) FROM 'x'"),
        "Line 1:7 expected a known function but found unknown function 'foo'"
    );
    assert_eq!(
        error("SELECT abs(1, 2) FROM 'x'"),
        "Line 1:7 expected 1 argument(s) for abs() but found 2 argument(s)"
    );
    assert_eq!(
        error("SELECT cast(a AS Blob) FROM 'x'"),
        "Line 1:17 expected a type name (String, Int, Decimal, Boolean, ...) but found 'Blob'"
    );
    assert_eq!(
        error("SELECT CASE a WHEN 1 THEN 2 FROM 'x'"),
        "Line 1:28 expected WHEN, ELSE or END but found 'FROM'"
    );
    assert_eq!(
        error("SELECT CASE a END FROM 'x'"),
        "Line 1:14 expected WHEN but found 'END'"
    );
    assert_eq!(
        error("SELECT regexp_matches(a, '(') FROM 'x'")
            .split(" (")
            .next()
            .unwrap(),
        "Line 1:7 expected a valid regular expression but found '('"
    );
    assert_eq!(
        error("SELECT get_dynamodb('t', 'k', 'v', 'r') FROM 'x'"),
        "Line 1:7 expected a function Mooring can evaluate locally but found 'get_dynamodb', which needs an AWS service Mooring does not provide"
    );
    assert_eq!(
        error("SELECT a FROM 'x' WHERE"),
        "Line 1:23 expected an expression but found end of input"
    );
    assert_eq!(
        error("SET @a = 1, @a = 2 SELECT 1 FROM 'x'"),
        "Line 1:12 expected a variable that is not already set but found '@a'"
    );
    assert_eq!(
        error("SELECT 'é"),
        "Line 1:7 expected a closing ' for the string starting here but found end of input"
    );
    assert!(error("SELECT 1x FROM 'a'").starts_with("Line 1:7 expected a number"));
    let nested = format!("SELECT {}1{} FROM 'a'", "(".repeat(500), ")".repeat(500));
    assert!(error(&nested).contains("less deeply nested"));
    let unary = format!("SELECT {}1 FROM 'a'", "NOT ".repeat(500));
    assert!(error(&unary).contains("less deeply nested"));
}

#[test]
fn version_2015_refuses_2016_features() {
    for sql in [
        "SELECT [1] FROM 'a'",
        "SELECT {'a': 1} FROM 'a'",
        "SELECT (SELECT VALUE n FROM e) FROM 'a'",
        "SELECT indexof('a', 'b') FROM 'a'",
        "SELECT cast(1 AS Boolean) FROM 'a'",
    ] {
        let err = sql::parse(sql, SqlVersion::V2015_10_08).expect_err(sql);
        assert!(
            err.expected.contains("2016-03-23"),
            "{sql}: {}",
            err.message()
        );
        sql::parse(sql, SqlVersion::V2016_03_23).expect(sql);
    }
}

/// A small deterministic generator (xorshift64*), so the test needs no extra crate and
/// fails the same way every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const VOCABULARY: &[&str] = &[
    "SELECT",
    "VALUE",
    "FROM",
    "WHERE",
    "SET",
    "AS",
    "AND",
    "OR",
    "NOT",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "IN",
    "IS",
    "NULL",
    "UNDEFINED",
    "true",
    "*",
    ",",
    ".",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ":",
    "+",
    "-",
    "/",
    "%",
    "=",
    "<>",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "'a/+/#'",
    "'s'",
    "\"d\"",
    "1",
    "2.5",
    "1e9",
    "a",
    "b",
    "@v",
    "abs",
    "concat",
    "cast",
    "get",
    "topic",
    "regexp_replace",
    "Int",
    "'",
    "\"",
    "@",
    "#",
    "\\",
    "é",
    "\n",
];

#[test]
fn random_token_soup_never_panics_and_errors_point_inside_the_input() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let facts = MessageFacts::new("a/b/c", br#"{"a":1,"b":[1,2],"e":[{"n":1}]}"#.to_vec());
    let mut parsed = 0;
    for _ in 0..20_000 {
        let len = 1 + rng.below(24);
        let mut text = String::new();
        for _ in 0..len {
            text.push_str(rng.pick(VOCABULARY));
            if rng.below(3) > 0 {
                text.push(' ');
            }
        }
        for version in [SqlVersion::V2015_10_08, SqlVersion::V2016_03_23] {
            match sql::parse(&text, version) {
                Ok(statement) => {
                    parsed += 1;
                    let _ = sql::evaluate(&statement, &facts, &NoExternalFunctions);
                }
                Err(e) => {
                    assert!(e.offset <= text.len(), "{text:?}: {e:?}");
                    assert!(!e.expected.is_empty());
                }
            }
        }
    }
    assert!(parsed > 0, "the soup should sometimes be valid SQL");
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    for _ in 0..20_000 {
        let len = rng.below(64);
        let bytes: Vec<u8> = (0..len).map(|_| (rng.next() & 0xff) as u8).collect();
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = sql::parse(&text, SqlVersion::DEFAULT) {
            assert!(e.offset <= text.len());
        }
    }
}

fn expression(rng: &mut Rng, depth: usize) -> String {
    if depth == 0 {
        return rng
            .pick(&[
                "a", "b", "b[1]", "e[0].n", "1", "2.5", "'x'", "true", "NULL", "nokey", "@v",
                "topic(2)",
            ])
            .to_string();
    }
    let l = expression(rng, depth - 1);
    let r = expression(rng, depth - 1);
    match rng.below(12) {
        0 => format!("{l} {} {r}", rng.pick(&["+", "-", "*", "/", "%"])),
        1 => format!("({l} {} {r})", rng.pick(&["=", "<>", "<", "<=", ">", ">="])),
        2 => format!("({l} {} {r})", rng.pick(&["AND", "OR"])),
        3 => format!("(NOT {l})"),
        4 => format!("-({l})"),
        5 => format!("CASE {l} WHEN {r} THEN 1 ELSE 2 END"),
        6 => format!("[{l}, {r}]"),
        7 => format!("{{'k': {l}, 'm': {r}}}"),
        8 => format!(
            "{}({l})",
            rng.pick(&[
                "abs",
                "lower",
                "length",
                "md5",
                "round",
                "isNull",
                "encode_dummy"
            ])
        )
        .replace("encode_dummy(", "sqrt("),
        9 => format!("concat({l}, {r})"),
        10 => format!(
            "cast({l} AS {})",
            rng.pick(&["String", "Int", "Decimal", "Boolean"])
        ),
        _ => format!("(SELECT VALUE n FROM e WHERE {l} = {r})"),
    }
}

#[test]
fn random_well_formed_statements_parse_and_evaluate() {
    let mut rng = Rng(0xfeed_beef_0000_0042);
    let facts = MessageFacts::new(
        "a/b/c",
        br#"{"a":3,"b":[1,"2",3.5],"e":[{"n":1},{"n":"x"}]}"#.to_vec(),
    );
    for _ in 0..3_000 {
        let depth = rng.below(4);
        let select = expression(&mut rng, depth);
        let condition_depth = rng.below(3);
        let condition = expression(&mut rng, condition_depth);
        let sql =
            format!("SET @v = {select} SELECT {select} AS out, * FROM 'a/#' WHERE {condition}");
        let statement = sql::parse(&sql, SqlVersion::V2016_03_23)
            .unwrap_or_else(|e| panic!("{sql}\n{}", e.message()));
        let _ = sql::evaluate(&statement, &facts, &NoExternalFunctions);
    }
}
