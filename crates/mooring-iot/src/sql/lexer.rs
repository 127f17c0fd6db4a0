//! Splits IoT SQL text into tokens, each with the byte offset where it starts.
//!
//! Keywords are not tokens of their own: an identifier is a keyword only where the parser
//! expects one (compared case-insensitively), so payload attributes called `value` or
//! `timestamp` stay addressable. Strings may be single- or double-quoted (AWS documentation
//! uses both); a quote is escaped by doubling it or with a backslash, and the backslash
//! escapes of JSON are understood. Numbers are Int when they have neither fraction nor
//! exponent and fit in 64 bits, Decimal otherwise.

use super::ParseError;

#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Ident(String),
    /// A SET variable, without its `@`.
    Variable(String),
    Str(String),
    Int(i64),
    Decimal(f64),
    Comma,
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Colon,
    Star,
    Plus,
    Minus,
    Slash,
    Percent,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    Eof,
}

impl Token {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Token::Ident(s) => format!("'{s}'"),
            Token::Variable(s) => format!("'@{s}'"),
            Token::Str(s) => format!("string '{s}'"),
            Token::Int(i) => format!("'{i}'"),
            Token::Decimal(d) => format!("'{d}'"),
            Token::Eof => "end of input".to_string(),
            other => format!("'{}'", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Token::Comma => ",",
            Token::Dot => ".",
            Token::LParen => "(",
            Token::RParen => ")",
            Token::LBracket => "[",
            Token::RBracket => "]",
            Token::LBrace => "{",
            Token::RBrace => "}",
            Token::Colon => ":",
            Token::Star => "*",
            Token::Plus => "+",
            Token::Minus => "-",
            Token::Slash => "/",
            Token::Percent => "%",
            Token::Eq => "=",
            Token::NotEq => "<>",
            Token::Lt => "<",
            Token::LtEq => "<=",
            Token::Gt => ">",
            Token::GtEq => ">=",
            _ => "?",
        }
    }
}

/// A token and the byte offset of its first character.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned {
    pub token: Token,
    pub offset: usize,
}

/// Tokenizes `text`; the last token is always [`Token::Eof`].
pub fn tokenize(text: &str) -> Result<Vec<Spanned>, ParseError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let simple = match c {
            b',' => Some(Token::Comma),
            b'(' => Some(Token::LParen),
            b')' => Some(Token::RParen),
            b'[' => Some(Token::LBracket),
            b']' => Some(Token::RBracket),
            b'{' => Some(Token::LBrace),
            b'}' => Some(Token::RBrace),
            b':' => Some(Token::Colon),
            b'*' => Some(Token::Star),
            b'+' => Some(Token::Plus),
            b'-' => Some(Token::Minus),
            b'/' => Some(Token::Slash),
            b'%' => Some(Token::Percent),
            b'=' => Some(Token::Eq),
            _ => None,
        };
        if let Some(token) = simple {
            out.push(Spanned {
                token,
                offset: start,
            });
            i += 1;
            continue;
        }
        match c {
            b'<' => {
                let (token, len) = match bytes.get(i + 1) {
                    Some(b'=') => (Token::LtEq, 2),
                    Some(b'>') => (Token::NotEq, 2),
                    _ => (Token::Lt, 1),
                };
                out.push(Spanned {
                    token,
                    offset: start,
                });
                i += len;
            }
            b'>' => {
                let (token, len) = match bytes.get(i + 1) {
                    Some(b'=') => (Token::GtEq, 2),
                    _ => (Token::Gt, 1),
                };
                out.push(Spanned {
                    token,
                    offset: start,
                });
                i += len;
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                out.push(Spanned {
                    token: Token::NotEq,
                    offset: start,
                });
                i += 2;
            }
            b'\'' | b'"' => {
                let (s, next) = lex_string(text, i)?;
                out.push(Spanned {
                    token: Token::Str(s),
                    offset: start,
                });
                i = next;
            }
            b'.' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                let (token, next) = lex_number(text, i)?;
                out.push(Spanned {
                    token,
                    offset: start,
                });
                i = next;
            }
            b'.' => {
                out.push(Spanned {
                    token: Token::Dot,
                    offset: start,
                });
                i += 1;
            }
            b'0'..=b'9' => {
                let (token, next) = lex_number(text, i)?;
                out.push(Spanned {
                    token,
                    offset: start,
                });
                i = next;
            }
            b'@' => {
                i += 1;
                let name_start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if i == name_start {
                    return Err(ParseError::at(
                        text,
                        start,
                        "a variable name after '@'",
                        describe_char(text, i),
                    ));
                }
                if i - name_start > 64 {
                    return Err(ParseError::at(
                        text,
                        start,
                        "a variable name of at most 64 characters",
                        format!("'@{}'", &text[name_start..i]),
                    ));
                }
                out.push(Spanned {
                    token: Token::Variable(text[name_start..i].to_string()),
                    offset: start,
                });
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'$')
                {
                    i += 1;
                }
                out.push(Spanned {
                    token: Token::Ident(text[start..i].to_string()),
                    offset: start,
                });
            }
            _ => {
                return Err(ParseError::at(
                    text,
                    start,
                    "a token",
                    describe_char(text, start),
                ))
            }
        }
    }
    out.push(Spanned {
        token: Token::Eof,
        offset: text.len(),
    });
    Ok(out)
}

fn describe_char(text: &str, at: usize) -> String {
    match text.get(at..).and_then(|rest| rest.chars().next()) {
        Some(c) => format!("'{c}'"),
        None => "end of input".to_string(),
    }
}

fn lex_string(text: &str, start: usize) -> Result<(String, usize), ParseError> {
    let quote = text.as_bytes()[start] as char;
    let mut out = String::new();
    let mut chars = text[start + 1..].char_indices().peekable();
    while let Some((rel, c)) = chars.next() {
        let at = start + 1 + rel;
        if c == quote {
            if chars.peek().map(|(_, n)| *n) == Some(quote) {
                chars.next();
                out.push(quote);
                continue;
            }
            return Ok((out, at + 1));
        }
        if c == '\\' {
            let Some((_, escaped)) = chars.next() else {
                break;
            };
            match escaped {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = (0..4)
                        .filter_map(|_| chars.next().map(|(_, c)| c))
                        .collect();
                    match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                        Some(c) if hex.len() == 4 => out.push(c),
                        _ => {
                            return Err(ParseError::at(
                                text,
                                at,
                                "four hexadecimal digits after '\\u'",
                                format!("'{hex}'"),
                            ))
                        }
                    }
                }
                other => out.push(other),
            }
            continue;
        }
        out.push(c);
    }
    Err(ParseError::at(
        text,
        start,
        &format!("a closing {quote} for the string starting here"),
        "end of input".to_string(),
    ))
}

fn lex_number(text: &str, start: usize) -> Result<(Token, usize), ParseError> {
    let bytes = text.as_bytes();
    let mut i = start;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let mut integral = true;
    if i < bytes.len() && bytes[i] == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
        integral = false;
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'-' || bytes[j] == b'+') {
            j += 1;
        }
        if j < bytes.len() && bytes[j].is_ascii_digit() {
            integral = false;
            i = j;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    if i < bytes.len() && (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
        return Err(ParseError::at(
            text,
            start,
            "a number",
            format!("'{}'", &text[start..=i]),
        ));
    }
    let literal = &text[start..i];
    if integral {
        if let Ok(n) = literal.parse::<i64>() {
            return Ok((Token::Int(n), i));
        }
    }
    match literal.parse::<f64>() {
        Ok(d) if d.is_finite() => Ok((Token::Decimal(d), i)),
        _ => Err(ParseError::at(
            text,
            start,
            "a number within range",
            format!("'{literal}'"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<Token> {
        tokenize(text)
            .unwrap()
            .into_iter()
            .map(|s| s.token)
            .collect()
    }

    #[test]
    fn tokenizes_operators_strings_and_numbers() {
        assert_eq!(
            tokens("a.b <> 'it''s' != \"x\\\"y\" >= 1.5e2 <= 7 @v"),
            vec![
                Token::Ident("a".into()),
                Token::Dot,
                Token::Ident("b".into()),
                Token::NotEq,
                Token::Str("it's".into()),
                Token::NotEq,
                Token::Str("x\"y".into()),
                Token::GtEq,
                Token::Decimal(150.0),
                Token::LtEq,
                Token::Int(7),
                Token::Variable("v".into()),
                Token::Eof,
            ]
        );
    }

    #[test]
    fn reports_unterminated_strings_with_their_position() {
        let err = tokenize("SELECT 'abc FROM x").unwrap_err();
        assert_eq!(err.offset, 7);
        assert!(err.message().contains("closing '"), "{}", err.message());
        let err = tokenize("SELECT a # b").unwrap_err();
        assert_eq!((err.line, err.column), (1, 9));
    }
}
