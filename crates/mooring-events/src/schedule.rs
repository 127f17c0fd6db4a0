//! Schedule expressions: `rate(value unit)` and the six-field EventBridge `cron(...)`, parsed
//! and validated at PutRule, and the computation of the next firing minute (UTC).

use time::{Date, OffsetDateTime, Weekday};

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Every `period_ms`, counted from the rule's creation.
    Rate {
        period_ms: i64,
    },
    Cron(Box<Cron>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: DaySpec,
    months: Vec<bool>,
    years: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq)]
enum DaySpec {
    /// Day-of-month values (`?` in day-of-week).
    Month(Vec<bool>, MonthSpecial),
    /// Day-of-week values, 1 = Sunday (`?` in day-of-month).
    Week(Vec<bool>, WeekSpecial),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MonthSpecial {
    None,
    Last,
    NearestWeekday(u8),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum WeekSpecial {
    None,
    Last(u8),
    Nth(u8, u8),
}

fn bad() -> String {
    "Parameter ScheduleExpression is not valid.".to_string()
}

pub fn parse(expr: &str) -> Result<Schedule, String> {
    let expr = expr.trim();
    if expr.len() > 256 {
        return Err(bad());
    }
    if let Some(inner) = expr.strip_prefix("rate(").and_then(|s| s.strip_suffix(')')) {
        let (value, unit) = inner.trim().split_once(' ').ok_or_else(bad)?;
        let value: i64 = value.parse().map_err(|_| bad())?;
        if value < 1 {
            return Err(bad());
        }
        let unit_ms = match (unit, value == 1) {
            ("minute", true) | ("minutes", false) => 60_000,
            ("hour", true) | ("hours", false) => 3_600_000,
            ("day", true) | ("days", false) => 86_400_000,
            _ => return Err(bad()),
        };
        return Ok(Schedule::Rate {
            period_ms: value.checked_mul(unit_ms).ok_or_else(bad)?,
        });
    }
    if let Some(inner) = expr.strip_prefix("cron(").and_then(|s| s.strip_suffix(')')) {
        return parse_cron(inner).map(|c| Schedule::Cron(Box::new(c)));
    }
    Err(bad())
}

const MONTHS: &[&str] = &[
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: &[&str] = &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn value(text: &str, names: &[&str], first: u32) -> Result<u32, String> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(i as u32 + first);
    }
    text.parse().map_err(|_| bad())
}

/// Parses a `, - * /` field into a membership table over `min..=max`.
fn field(text: &str, min: u32, max: u32, names: &[&str]) -> Result<Vec<bool>, String> {
    let mut set = vec![false; max as usize + 1];
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s.parse::<u32>().map_err(|_| bad())?)),
            None => (part, None),
        };
        if step == Some(0) {
            return Err(bad());
        }
        let (start, end) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a, names, min)?, value(b, names, min)?)
        } else {
            let v = value(range, names, min)?;
            (v, if step.is_some() { max } else { v })
        };
        if start < min || start > max || end < min || end > max {
            return Err(bad());
        }
        let step = step.unwrap_or(1);
        let span = if end >= start {
            end - start
        } else {
            max - start + 1 + end - min
        };
        let mut offset = 0;
        while offset <= span {
            let v = start + offset;
            let v = if v > max { v - (max - min + 1) } else { v };
            set[v as usize] = true;
            offset += step;
        }
    }
    Ok(set)
}

fn parse_cron(inner: &str) -> Result<Cron, String> {
    let parts: Vec<&str> = inner.split_whitespace().collect();
    let [minutes, hours, dom, month, dow, year] = parts.as_slice() else {
        return Err(bad());
    };
    let days = match (*dom, *dow) {
        ("?", "?") => return Err(bad()),
        (dom, "?") => {
            if dom == "L" {
                DaySpec::Month(vec![false; 32], MonthSpecial::Last)
            } else if let Some(d) = dom.strip_suffix('W') {
                let d: u8 = d.parse().map_err(|_| bad())?;
                if !(1..=31).contains(&d) {
                    return Err(bad());
                }
                DaySpec::Month(vec![false; 32], MonthSpecial::NearestWeekday(d))
            } else {
                DaySpec::Month(field(dom, 1, 31, &[])?, MonthSpecial::None)
            }
        }
        ("?", dow) => {
            if let Some((d, n)) = dow.split_once('#') {
                let d = value(d, DAYS, 1)? as u8;
                let n: u8 = n.parse().map_err(|_| bad())?;
                if !(1..=7).contains(&d) || !(1..=5).contains(&n) {
                    return Err(bad());
                }
                DaySpec::Week(vec![false; 8], WeekSpecial::Nth(d, n))
            } else if let Some(d) = dow.strip_suffix('L').filter(|d| !d.is_empty()) {
                let d = value(d, DAYS, 1)? as u8;
                if !(1..=7).contains(&d) {
                    return Err(bad());
                }
                DaySpec::Week(vec![false; 8], WeekSpecial::Last(d))
            } else if dow == "L" {
                DaySpec::Week(vec![false; 8], WeekSpecial::Last(7))
            } else {
                DaySpec::Week(field(dow, 1, 7, DAYS)?, WeekSpecial::None)
            }
        }
        _ => return Err(bad()),
    };
    Ok(Cron {
        minutes: field(minutes, 0, 59, &[])?,
        hours: field(hours, 0, 23, &[])?,
        days,
        months: field(month, 1, 12, MONTHS)?,
        years: field(year, 1970, 2199, &[])?,
    })
}

fn weekday_number(w: Weekday) -> u8 {
    w.number_days_from_sunday() + 1
}

impl Cron {
    fn day_matches(&self, date: Date) -> bool {
        let last = date.month().length(date.year());
        match &self.days {
            DaySpec::Month(set, MonthSpecial::None) => set[date.day() as usize],
            DaySpec::Month(_, MonthSpecial::Last) => date.day() == last,
            DaySpec::Month(_, MonthSpecial::NearestWeekday(d)) => {
                let target = (*d).min(last);
                let Ok(t) = Date::from_calendar_date(date.year(), date.month(), target) else {
                    return false;
                };
                let nearest = match t.weekday() {
                    Weekday::Saturday if target == 1 => t + time::Duration::days(2),
                    Weekday::Saturday => t - time::Duration::days(1),
                    Weekday::Sunday if target == last => t - time::Duration::days(2),
                    Weekday::Sunday => t + time::Duration::days(1),
                    _ => t,
                };
                nearest == date
            }
            DaySpec::Week(set, WeekSpecial::None) => set[weekday_number(date.weekday()) as usize],
            DaySpec::Week(_, WeekSpecial::Last(d)) => {
                weekday_number(date.weekday()) == *d && date.day() + 7 > last
            }
            DaySpec::Week(_, WeekSpecial::Nth(d, n)) => {
                weekday_number(date.weekday()) == *d && (date.day() - 1) / 7 + 1 == *n
            }
        }
    }

    /// The first minute strictly after `after_ms` at which this expression fires.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let start =
            OffsetDateTime::from_unix_timestamp(after_ms.div_euclid(60_000) * 60 + 60).ok()?;
        let mut date = start.date();
        let mut first_day = true;
        for _ in 0..(366 * 230) {
            let year_ok = date.year() >= 1970
                && self
                    .years
                    .get(date.year() as usize)
                    .copied()
                    .unwrap_or(false);
            if date.year() > 2199 {
                return None;
            }
            if year_ok && self.months[u8::from(date.month()) as usize] && self.day_matches(date) {
                let (h0, m0) = if first_day {
                    (start.hour(), start.minute())
                } else {
                    (0, 0)
                };
                for h in h0..24 {
                    if !self.hours[h as usize] {
                        continue;
                    }
                    let m_start = if h == h0 { m0 } else { 0 };
                    for m in m_start..60 {
                        if self.minutes[m as usize] {
                            let t = date.with_hms(h, m, 0).ok()?.assume_utc();
                            return Some(t.unix_timestamp() * 1000);
                        }
                    }
                }
            }
            first_day = false;
            date = date.next_day()?;
        }
        None
    }
}

impl Schedule {
    /// The next firing time after `after_ms` for a rule created at `created_ms`.
    pub fn next_after(&self, created_ms: i64, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Rate { period_ms } => {
                let elapsed = (after_ms - created_ms).max(0);
                Some(created_ms + (elapsed / period_ms + 1) * period_ms)
            }
            Schedule::Cron(c) => c.next_after(after_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        crate::model::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn rate_grammar() {
        assert_eq!(
            parse("rate(1 hour)").unwrap(),
            Schedule::Rate {
                period_ms: 3_600_000
            }
        );
        assert_eq!(
            parse("rate(5 minutes)").unwrap(),
            Schedule::Rate { period_ms: 300_000 }
        );
        for bad in [
            "rate(1 hours)",
            "rate(5 hour)",
            "rate(0 minutes)",
            "rate(x minutes)",
            "rate(1 week)",
            "every minute",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cron_examples_from_the_guide_parse_and_fire() {
        for ok in [
            "cron(0 10 * * ? *)",
            "cron(15 12 * * ? *)",
            "cron(0 18 ? * MON-FRI *)",
            "cron(0 8 1 * ? *)",
            "cron(0/15 * * * ? *)",
            "cron(0/10 * ? * MON-FRI *)",
            "cron(0/5 8-17 ? * MON-FRI *)",
            "cron(0/30 20-2 ? * MON-FRI *)",
            "cron(5,35 14 * * ? *)",
            "cron(15 10 ? * 6L 2019-2022)",
            "cron(0 0 L * ? *)",
            "cron(0 0 3W * ? *)",
            "cron(0 0 ? * 3#2 *)",
        ] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "cron(0 10 * * * *)",
            "cron(0 10 ? * ? *)",
            "cron(0 10 * *)",
            "cron(61 * * * ? *)",
            "cron(0 24 * * ? *)",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let s = parse("cron(0 18 ? * MON-FRI *)").unwrap();
        // 2026-11-21 is a Saturday: next firing is Monday 18:00.
        assert_eq!(
            s.next_after(0, at("2026-11-21T12:00:00Z")),
            Some(at("2026-11-23T18:00:00Z"))
        );
        let s = parse("cron(0/15 * * * ? *)").unwrap();
        assert_eq!(
            s.next_after(0, at("2026-11-21T12:07:30Z")),
            Some(at("2026-11-21T12:15:00Z"))
        );
        let s = parse("cron(0/30 20-2 ? * MON-FRI *)").unwrap();
        assert_eq!(
            s.next_after(0, at("2026-11-23T02:45:00Z")),
            Some(at("2026-11-23T20:00:00Z"))
        );
        let s = parse("cron(0 0 ? * 3#2 *)").unwrap();
        assert_eq!(
            s.next_after(0, at("2026-11-01T00:00:00Z")),
            Some(at("2026-11-10T00:00:00Z"))
        );
        let s = parse("cron(0 0 L * ? *)").unwrap();
        assert_eq!(
            s.next_after(0, at("2026-02-03T00:00:00Z")),
            Some(at("2026-02-28T00:00:00Z"))
        );
        let s = parse("rate(10 minutes)").unwrap();
        assert_eq!(
            s.next_after(1_000, 1_000 + 25 * 60_000),
            Some(1_000 + 30 * 60_000)
        );
    }
}
