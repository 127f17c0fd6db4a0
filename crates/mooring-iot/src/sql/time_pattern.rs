//! Date-time patterns for `parse_time` (Joda-Time formatting) and `time_to_epoch`
//! (`java.time.format.DateTimeFormatter` parsing).
//!
//! A pattern is a run of letter fields (`yyyy`, `MM`, `HH`, ...), quoted literals (`'T'`,
//! with `''` for a quote) and other characters taken literally. Calendar arithmetic and
//! time-zone rules come from `chrono` and `chrono-tz`; the pattern languages are Mooring's.
//! Zones are IANA names (`America/Los_Angeles`), `UTC`/`GMT`/`Z`, offsets (`+01:00`,
//! `-0800`) and offsets after `UTC`/`GMT`/`UT` (`UTC+01:00`).

use std::str::FromStr;

use chrono::{
    DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike, Utc,
};
use chrono_tz::{OffsetName, Tz};

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Literal(String),
    Letter(char, usize),
}

fn tokenize(pattern: &str) -> Result<Vec<Field>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() {
            let mut n = 1;
            while i + n < chars.len() && chars[i + n] == c {
                n += 1;
            }
            out.push(Field::Letter(c, n));
            i += n;
        } else if c == '\'' {
            if chars.get(i + 1) == Some(&'\'') {
                out.push(Field::Literal("'".into()));
                i += 2;
                continue;
            }
            let mut literal = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated quote in pattern".into()),
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        literal.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        literal.push(*c);
                        i += 1;
                    }
                }
            }
            out.push(Field::Literal(literal));
        } else {
            out.push(Field::Literal(c.to_string()));
            i += 1;
        }
    }
    Ok(out)
}

/// A time zone: a named IANA zone or a fixed offset.
#[derive(Debug, Clone, Copy)]
pub enum Zone {
    Named(Tz),
    Fixed(FixedOffset),
}

impl Zone {
    pub fn utc() -> Zone {
        Zone::Named(Tz::UTC)
    }

    /// Parses a zone name as `parse_time`'s third argument and `VV`/`z` fields accept it.
    pub fn parse(text: &str) -> Option<Zone> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("Z") || t.eq_ignore_ascii_case("UTC") {
            return Some(Zone::utc());
        }
        for prefix in ["UTC", "GMT", "UT"] {
            if let Some(rest) = t.strip_prefix(prefix) {
                if rest.is_empty() {
                    return Some(Zone::utc());
                }
                if let Some(offset) = parse_offset(rest) {
                    return Some(Zone::Fixed(offset));
                }
            }
        }
        if let Some(offset) = parse_offset(t) {
            return Some(Zone::Fixed(offset));
        }
        if let Ok(tz) = Tz::from_str(t) {
            return Some(Zone::Named(tz));
        }
        let fixed_hours = match t {
            "EST" => -5,
            "EDT" => -4,
            "CST" => -6,
            "CDT" => -5,
            "MST" => -7,
            "MDT" => -6,
            "PST" => -8,
            "PDT" => -7,
            "CET" => 1,
            "CEST" => 2,
            _ => return None,
        };
        FixedOffset::east_opt(fixed_hours * 3600).map(Zone::Fixed)
    }

    fn id(&self) -> String {
        match self {
            Zone::Named(tz) => tz.name().to_string(),
            Zone::Fixed(offset) => format_offset(offset.local_minus_utc(), true),
        }
    }
}

/// `+HH`, `+HHMM`, `+HH:MM` (or `-`), with one-digit hours allowed.
fn parse_offset(text: &str) -> Option<FixedOffset> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 6 {
        return None;
    }
    let (h, m, s) = match digits.len() {
        1 | 2 => (digits.parse::<i32>().ok()?, 0, 0),
        3 => (digits[..1].parse().ok()?, digits[1..].parse().ok()?, 0),
        4 => (digits[..2].parse().ok()?, digits[2..].parse().ok()?, 0),
        6 => (
            digits[..2].parse().ok()?,
            digits[2..4].parse().ok()?,
            digits[4..].parse().ok()?,
        ),
        _ => return None,
    };
    if h > 18 || m > 59 || s > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60 + s))
}

fn format_offset(seconds: i32, colon: bool) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let abs = seconds.abs();
    let (h, m) = (abs / 3600, (abs % 3600) / 60);
    if colon {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}{m:02}")
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

fn pad(n: i64, width: usize) -> String {
    if n < 0 {
        format!("-{:0width$}", -n, width = width)
    } else {
        format!("{n:0width$}")
    }
}

/// Formats `millis` since the epoch in `zone` with a Joda-Time pattern.
pub fn format_joda(pattern: &str, millis: i64, zone: Zone) -> Result<String, String> {
    let fields = tokenize(pattern)?;
    let utc = DateTime::<Utc>::from_timestamp_millis(millis).ok_or("timestamp out of range")?;
    let (local, offset_seconds, short_name): (NaiveDateTime, i32, String) = match zone {
        Zone::Named(tz) => {
            let dt = utc.with_timezone(&tz);
            let offset = dt.offset();
            let short = offset
                .abbreviation()
                .map(str::to_string)
                .unwrap_or_else(|| format_offset(offset.fix().local_minus_utc(), true));
            (dt.naive_local(), offset.fix().local_minus_utc(), short)
        }
        Zone::Fixed(offset) => {
            let dt = utc.with_timezone(&offset);
            (
                dt.naive_local(),
                offset.local_minus_utc(),
                format_offset(offset.local_minus_utc(), true),
            )
        }
    };
    let mut out = String::new();
    for field in fields {
        let (letter, n) = match field {
            Field::Literal(s) => {
                out.push_str(&s);
                continue;
            }
            Field::Letter(c, n) => (c, n),
        };
        let year = local.year() as i64;
        let piece = match letter {
            'G' => if year > 0 { "AD" } else { "BC" }.to_string(),
            'C' => pad(year / 100, n),
            'y' | 'Y' | 'u' => {
                if n == 2 {
                    pad(year.rem_euclid(100), 2)
                } else {
                    pad(year, n)
                }
            }
            'x' => {
                let iso = local.iso_week().year() as i64;
                if n == 2 {
                    pad(iso.rem_euclid(100), 2)
                } else {
                    pad(iso, n)
                }
            }
            'w' => pad(local.iso_week().week() as i64, n),
            'e' => pad(local.weekday().number_from_monday() as i64, n),
            'E' => {
                let name = WEEKDAYS[local.weekday().num_days_from_monday() as usize];
                if n >= 4 {
                    name.to_string()
                } else {
                    name[..3].to_string()
                }
            }
            'D' => pad(local.ordinal() as i64, n),
            'M' => {
                let month = local.month() as usize;
                match n {
                    1 | 2 => pad(month as i64, n),
                    3 => MONTHS[month - 1][..3].to_string(),
                    _ => MONTHS[month - 1].to_string(),
                }
            }
            'd' => pad(local.day() as i64, n),
            'a' => if local.hour() < 12 { "AM" } else { "PM" }.to_string(),
            'K' => pad((local.hour() % 12) as i64, n),
            'h' => pad(
                match local.hour() % 12 {
                    0 => 12,
                    h => h,
                } as i64,
                n,
            ),
            'H' => pad(local.hour() as i64, n),
            'k' => pad(
                match local.hour() {
                    0 => 24,
                    h => h,
                } as i64,
                n,
            ),
            'm' => pad(local.minute() as i64, n),
            's' => pad(local.second() as i64, n),
            'S' => {
                let millis = format!("{:03}", local.nanosecond() / 1_000_000);
                let mut digits: String = millis.chars().take(n).collect();
                while digits.len() < n {
                    digits.push('0');
                }
                digits
            }
            'z' => {
                if n >= 4 {
                    zone.id()
                } else {
                    short_name.clone()
                }
            }
            'Z' => match n {
                1 => format_offset(offset_seconds, false),
                2 => format_offset(offset_seconds, true),
                _ => zone.id(),
            },
            other => return Err(format!("unsupported pattern letter '{other}'")),
        };
        out.push_str(&piece);
    }
    Ok(out)
}

#[derive(Default)]
struct Parsed {
    year: Option<i32>,
    month: Option<u32>,
    day: Option<u32>,
    day_of_year: Option<u32>,
    hour: Option<u32>,
    hour12: Option<u32>,
    pm: Option<bool>,
    minute: u32,
    second: u32,
    nanos: u32,
    zone: Option<Zone>,
}

struct Input<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Input<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn digits(&mut self, min: usize, max: usize) -> Result<i64, String> {
        let rest = self.rest().as_bytes();
        let mut n = 0;
        while n < max && n < rest.len() && rest[n].is_ascii_digit() {
            n += 1;
        }
        if n < min {
            return Err(format!("expected {min} digit(s) at position {}", self.pos));
        }
        let value = self.rest()[..n].parse::<i64>().map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(value)
    }

    fn word(&mut self, candidates: &[&str], min_len: usize) -> Result<usize, String> {
        let rest = self.rest();
        for (i, full) in candidates.iter().enumerate() {
            for len in [full.len(), min_len] {
                if len <= full.len()
                    && rest.len() >= len
                    && rest.is_char_boundary(len)
                    && rest[..len].eq_ignore_ascii_case(&full[..len])
                {
                    self.pos += len;
                    return Ok(i);
                }
            }
        }
        Err(format!("unrecognized name at position {}", self.pos))
    }

    fn zone_text(&mut self) -> &'a str {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/_+-:".contains(c)))
            .unwrap_or(rest.len());
        self.pos += len;
        &rest[..len]
    }
}

fn is_numeric_letter(c: char) -> bool {
    "yuMLdDHhkKmsSn".contains(c)
}

/// Parses `text` with a `java.time` pattern and answers epoch milliseconds (UTC unless the
/// text carries a zone or offset).
pub fn parse_java(text: &str, pattern: &str) -> Result<i64, String> {
    let fields = tokenize(pattern)?;
    let mut input = Input { text, pos: 0 };
    let mut parsed = Parsed::default();
    for (index, field) in fields.iter().enumerate() {
        let (letter, n) = match field {
            Field::Literal(lit) => {
                if input.rest().starts_with(lit.as_str()) {
                    input.pos += lit.len();
                    continue;
                }
                return Err(format!("expected '{lit}' at position {}", input.pos));
            }
            Field::Letter(c, n) => (*c, *n),
        };
        let adjacent_number =
            matches!(fields.get(index + 1), Some(Field::Letter(c, _)) if is_numeric_letter(*c));
        let (min, max) = if n == 1 {
            (1, if adjacent_number { 1 } else { 2 })
        } else {
            (n, n)
        };
        match letter {
            'y' | 'u' => {
                if n == 2 {
                    parsed.year = Some(2000 + input.digits(2, 2)? as i32);
                } else {
                    let max = if adjacent_number { n } else { 9 };
                    parsed.year = Some(input.digits(n.max(1), max.max(n))? as i32);
                }
            }
            'M' | 'L' => {
                parsed.month = Some(if n >= 3 {
                    input.word(&MONTHS, 3)? as u32 + 1
                } else {
                    input.digits(min, max)? as u32
                })
            }
            'd' => parsed.day = Some(input.digits(min, max)? as u32),
            'D' => {
                parsed.day_of_year =
                    Some(input.digits(n, if n == 1 { 3 } else { n.max(3) })? as u32)
            }
            'H' => parsed.hour = Some(input.digits(min, max)? as u32),
            'k' => parsed.hour = Some(input.digits(min, max)? as u32 % 24),
            'h' => parsed.hour12 = Some(input.digits(min, max)? as u32 % 12),
            'K' => parsed.hour12 = Some(input.digits(min, max)? as u32),
            'm' => parsed.minute = input.digits(min, max)? as u32,
            's' => parsed.second = input.digits(min, max)? as u32,
            'S' => {
                let digits = input.digits(n, n)?;
                parsed.nanos = (digits * 10i64.pow(9u32.saturating_sub(n as u32))) as u32;
            }
            'n' => parsed.nanos = input.digits(1, 9)? as u32,
            'a' => parsed.pm = Some(input.word(&["AM", "PM"], 2)? == 1),
            'E' => {
                input.word(&WEEKDAYS, 3)?;
            }
            'V' | 'z' => {
                let at = input.pos;
                let id = input.zone_text();
                parsed.zone = Some(
                    Zone::parse(id)
                        .ok_or_else(|| format!("unknown time zone '{id}' at position {at}"))?,
                );
            }
            'X' | 'x' | 'Z' | 'O' => {
                let at = input.pos;
                let id = input.zone_text();
                let zone = if letter == 'O' {
                    Zone::parse(id)
                } else if id == "Z" && letter != 'x' {
                    Some(Zone::utc())
                } else {
                    parse_offset(id).map(Zone::Fixed)
                };
                parsed.zone =
                    Some(zone.ok_or_else(|| format!("invalid offset '{id}' at position {at}"))?);
            }
            other => return Err(format!("unsupported pattern letter '{other}'")),
        }
    }
    if input.pos != text.len() {
        return Err(format!("unparsed text at position {}", input.pos));
    }
    let year = parsed.year.ok_or("the pattern has no year")?;
    let date = match parsed.day_of_year {
        Some(doy) => NaiveDate::from_yo_opt(year, doy),
        None => NaiveDate::from_ymd_opt(year, parsed.month.unwrap_or(1), parsed.day.unwrap_or(1)),
    }
    .ok_or("invalid date")?;
    let hour = match (parsed.hour, parsed.hour12, parsed.pm) {
        (Some(h), _, _) => h,
        (None, Some(h), Some(true)) => h + 12,
        (None, Some(h), _) => h,
        (None, None, _) => 0,
    };
    let local = date
        .and_hms_nano_opt(hour, parsed.minute, parsed.second, parsed.nanos)
        .ok_or("invalid time")?;
    let utc = match parsed.zone.unwrap_or(Zone::utc()) {
        Zone::Named(tz) => tz
            .from_local_datetime(&local)
            .earliest()
            .ok_or("the local time does not exist in that zone")?
            .with_timezone(&Utc),
        Zone::Fixed(offset) => offset
            .from_local_datetime(&local)
            .single()
            .ok_or("invalid local time")?
            .with_timezone(&Utc),
    };
    Ok(utc.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_joda_patterns() {
        let ms = 1_438_646_429_123; // 2015-08-04T00:00:29.123Z
        let f = |p: &str| format_joda(p, ms, Zone::utc()).unwrap();
        assert_eq!(
            f("yyyy-MM-dd'T'HH:mm:ss.SSSZ"),
            "2015-08-04T00:00:29.123+0000"
        );
        assert_eq!(f("yy/M/d h:mm a"), "15/8/4 12:00 AM");
        assert_eq!(f("EEE, dd MMM yyyy"), "Tue, 04 Aug 2015");
        assert_eq!(f("EEEE MMMM D ZZ z"), "Tuesday August 216 +00:00 UTC");
        let la = Zone::parse("America/Los_Angeles").unwrap();
        assert_eq!(
            format_joda("yyyy-MM-dd HH:mm:ss z ZZ ZZZ", ms, la).unwrap(),
            "2015-08-03 17:00:29 PDT -07:00 America/Los_Angeles"
        );
        assert!(format_joda("yyyy 'oops", ms, Zone::utc()).is_err());
        assert!(format_joda("qqq", ms, Zone::utc()).is_err());
    }

    #[test]
    fn parses_java_patterns_as_the_aws_examples_do() {
        assert_eq!(
            parse_java("2020-04-03 09:45:18 UTC+01:00", "yyyy-MM-dd HH:mm:ss VV").unwrap(),
            1_585_903_518_000
        );
        assert_eq!(
            parse_java("18 December 2015", "dd MMMM yyyy").unwrap(),
            1_450_396_800_000
        );
        assert_eq!(
            parse_java(
                "2007-12-03 10:15:30.592 America/Los_Angeles",
                "yyyy-MM-dd HH:mm:ss.SSS z"
            )
            .unwrap(),
            1_196_705_730_592
        );
        assert_eq!(
            parse_java("2022-01-02T03:04:05Z", "yyyy-MM-dd'T'HH:mm:ssX").unwrap(),
            1_641_092_645_000
        );
        assert_eq!(
            parse_java("20220102", "yyyyMMdd").unwrap(),
            1_641_081_600_000
        );
        assert!(parse_java("2022-13-01", "yyyy-MM-dd").is_err());
        assert!(parse_java("2022-01-01 extra", "yyyy-MM-dd").is_err());
    }
}
