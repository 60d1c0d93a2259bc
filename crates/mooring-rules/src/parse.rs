//! The condition and action parsers: a tokenizer that remembers columns, then one function per
//! form. Every error names the column (1-based, in characters) where the text went wrong.

use crate::{
    Action, Condition, Event, Op, Severity, ACTIONS_MAX, COUNT_THRESHOLD_MAX, RULE_DURATION_MS_MAX,
    RULE_TEXT_LEN_MAX,
};
use mooring_proto::telemetry::METRIC_NAME_LEN_MAX;

/// Why a condition or an action list was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct ParseError {
    /// 1-based, in characters; one past the end for "ended too early".
    pub column: usize,
    pub message: String,
}

fn err<T>(column: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        column,
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Op(Op),
    Open,
    Close,
    Comma,
}

fn tokens(text: &str) -> Result<Vec<(usize, Tok)>, ParseError> {
    if text.len() > RULE_TEXT_LEN_MAX {
        return err(1, format!("longer than {RULE_TEXT_LEN_MAX} bytes"));
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let next_eq = chars.get(i + 1) == Some(&'=');
        let (tok, len) = match c {
            '(' => (Tok::Open, 1),
            ')' => (Tok::Close, 1),
            ',' => (Tok::Comma, 1),
            '<' if next_eq => (Tok::Op(Op::Le), 2),
            '<' => (Tok::Op(Op::Lt), 1),
            '>' if next_eq => (Tok::Op(Op::Ge), 2),
            '>' => (Tok::Op(Op::Gt), 1),
            '=' if next_eq => (Tok::Op(Op::Eq), 2),
            '!' if next_eq => (Tok::Op(Op::Ne), 2),
            '=' | '!' => {
                return err(
                    col,
                    format!("{c:?} is not an operator; use <, <=, >, >=, == or !="),
                )
            }
            _ => {
                let start = i;
                while i < chars.len()
                    && !chars[i].is_whitespace()
                    && !matches!(chars[i], '(' | ')' | ',' | '<' | '>' | '=' | '!')
                {
                    i += 1;
                }
                out.push((col, Tok::Word(chars[start..i].iter().collect())));
                continue;
            }
        };
        out.push((col, tok));
        i += len;
    }
    Ok(out)
}

struct Cursor {
    toks: Vec<(usize, Tok)>,
    at: usize,
    /// The column one past the end of the text.
    end: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|(_, t)| t)
    }
    fn column(&self) -> usize {
        self.toks.get(self.at).map_or(self.end, |(c, _)| *c)
    }
    fn next(&mut self, expected: &str) -> Result<(usize, Tok), ParseError> {
        match self.toks.get(self.at) {
            Some(t) => {
                self.at += 1;
                Ok(t.clone())
            }
            None => err(self.end, format!("ended early: expected {expected}")),
        }
    }
    fn word(&mut self, expected: &str) -> Result<(usize, String), ParseError> {
        match self.next(expected)? {
            (col, Tok::Word(w)) => Ok((col, w)),
            (col, _) => err(col, format!("expected {expected}")),
        }
    }
    fn keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        let (col, w) = self.word(&format!("{kw:?}"))?;
        if w != kw {
            return err(col, format!("expected {kw:?}, found {w:?}"));
        }
        Ok(())
    }
    fn punct(&mut self, tok: Tok, what: &str) -> Result<(), ParseError> {
        let (col, t) = self.next(what)?;
        if t != tok {
            return err(col, format!("expected {what}"));
        }
        Ok(())
    }
    fn op(&mut self) -> Result<Op, ParseError> {
        match self.next("an operator (<, <=, >, >=, ==, !=)")? {
            (_, Tok::Op(op)) => Ok(op),
            (col, _) => err(col, "expected an operator (<, <=, >, >=, ==, !=)"),
        }
    }
    fn number(&mut self) -> Result<f64, ParseError> {
        let (col, w) = self.word("a number")?;
        let looks_numeric = w
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.'));
        match w.parse::<f64>() {
            Ok(n) if looks_numeric && n.is_finite() => Ok(n),
            _ => err(col, format!("expected a number, found {w:?}")),
        }
    }
    fn duration(&mut self) -> Result<u64, ParseError> {
        let (col, w) = self.word("a duration like 10m")?;
        match mooring_api::parse_duration_ms(&w) {
            Ok(ms) if ms <= RULE_DURATION_MS_MAX => Ok(ms),
            Ok(_) => err(col, format!("{w:?} is longer than 30 days")),
            Err(e) => err(col, e),
        }
    }
    fn metric(&mut self) -> Result<String, ParseError> {
        let (col, w) = self.word("a metric name")?;
        check_metric(&w).or_else(|m| err(col, m))?;
        Ok(w)
    }
    fn event(&mut self) -> Result<Event, ParseError> {
        let (col, w) = self.word("an event")?;
        Event::parse(&w).ok_or_else(|| ParseError {
            column: col,
            message: format!(
                "unknown event {w:?}; one of {}",
                Event::ALL.map(Event::as_str).join(", ")
            ),
        })
    }
    fn done(&self) -> Result<(), ParseError> {
        match self.toks.get(self.at) {
            None => Ok(()),
            Some((col, _)) => err(*col, "unexpected text after the condition"),
        }
    }
}

/// A metric name as rules write it: a letter or `_` first, then letters, digits, `.`, `_`,
/// `-`, `/` (flattened names like `battery.v`).
fn check_metric(w: &str) -> Result<(), String> {
    let ok = w.len() <= METRIC_NAME_LEN_MAX
        && w.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{w:?} is not a metric name (a letter or '_' first, then letters, digits, '.', '_', '-', '/'; at most {METRIC_NAME_LEN_MAX} bytes)"
        ))
    }
}

pub(crate) fn condition(text: &str) -> Result<Condition, ParseError> {
    let toks = tokens(text)?;
    let mut c = Cursor {
        toks,
        at: 0,
        end: text.chars().count() + 1,
    };
    if c.peek().is_none() {
        return err(1, "empty condition");
    }
    let second_is_word = matches!(c.toks.get(1), Some((_, Tok::Word(_))));
    let second_is_open = matches!(c.toks.get(1), Some((_, Tok::Open)));
    let first = match c.peek() {
        Some(Tok::Word(w)) => w.clone(),
        _ => {
            return err(
                c.column(),
                "expected a metric name, rate(...), count(...), no or on",
            )
        }
    };
    let cond = match first.as_str() {
        "no" if second_is_word => {
            c.at += 1;
            let metric = match c.peek() {
                Some(Tok::Word(w)) if w == "telemetry" => {
                    c.at += 1;
                    None
                }
                _ => Some(c.metric()?),
            };
            c.keyword("for")?;
            let for_ms = c.duration()?;
            Condition::Absent { metric, for_ms }
        }
        "on" if second_is_word => {
            c.at += 1;
            Condition::On { event: c.event()? }
        }
        "rate" if second_is_open => {
            c.at += 2;
            let metric = c.metric()?;
            c.punct(Tok::Comma, "',' and a window")?;
            let window_ms = c.duration()?;
            c.punct(Tok::Close, "')'")?;
            let op = c.op()?;
            let threshold = c.number()?;
            Condition::Rate {
                metric,
                window_ms,
                op,
                threshold,
            }
        }
        "count" if second_is_open => {
            c.at += 2;
            let event = c.event()?;
            c.punct(Tok::Comma, "',' and a window")?;
            let window_ms = c.duration()?;
            c.punct(Tok::Close, "')'")?;
            let op = c.op()?;
            let col = c.column();
            let threshold = c.number()?;
            if threshold.fract() != 0.0 || !(0.0..=COUNT_THRESHOLD_MAX).contains(&threshold) {
                return err(
                    col,
                    format!("a count compares with a whole number from 0 to {COUNT_THRESHOLD_MAX}"),
                );
            }
            Condition::Count {
                event,
                window_ms,
                op,
                threshold,
            }
        }
        _ => {
            let metric = c.metric()?;
            let op = c.op()?;
            let threshold = c.number()?;
            let for_ms = match c.peek() {
                Some(Tok::Word(w)) if w == "for" => {
                    c.at += 1;
                    c.duration()?
                }
                _ => 0,
            };
            Condition::Threshold {
                metric,
                op,
                threshold,
                for_ms,
            }
        }
    };
    c.done()?;
    Ok(cond)
}

/// Parses `alert:warning,command:diagnostics,...` (see the crate doc).
pub fn parse_actions(text: &str) -> Result<Vec<Action>, ParseError> {
    if text.len() > RULE_TEXT_LEN_MAX {
        return err(1, format!("longer than {RULE_TEXT_LEN_MAX} bytes"));
    }
    let mut out = Vec::new();
    let mut col = 1;
    for part in text.split(',') {
        let lead = part.chars().take_while(|c| c.is_whitespace()).count();
        let at = col + lead;
        let p = part.trim();
        col += part.chars().count() + 1;
        let Some((kind, arg)) = p.split_once(':') else {
            return err(
                at,
                format!("{p:?} is not an action; write kind:argument (alert:warning, command:diagnostics, tag:k=v, webhook:name, nats:subject, job:kind)"),
            );
        };
        let arg_col = at + kind.chars().count() + 1;
        let action = match kind {
            "alert" => Action::Alert(Severity::parse(arg).ok_or_else(|| ParseError {
                column: arg_col,
                message: format!("unknown severity {arg:?}; info, warning or critical"),
            })?),
            "command" => {
                if !mooring_proto::command::is_valid_command_name(arg)
                    || arg.starts_with("mooring.")
                {
                    return err(
                        arg_col,
                        format!("{arg:?} is not a command name a rule may send"),
                    );
                }
                Action::Command(arg.to_owned())
            }
            "tag" => {
                let Some((key, value)) = arg.split_once('=') else {
                    return err(arg_col, "a tag action is tag:key=value");
                };
                mooring_proto::selector::check_value("tag key", key)
                    .and_then(|()| mooring_proto::selector::check_value("tag value", value))
                    .or_else(|m| err(arg_col, m))?;
                Action::Tag {
                    key: key.to_owned(),
                    value: value.to_owned(),
                }
            }
            "webhook" | "nats" | "job" => {
                let ok = !arg.is_empty()
                    && arg.len() <= 128
                    && arg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                if !ok {
                    return err(
                        arg_col,
                        format!("{arg:?}: 1-128 characters of letters, digits, '.', '_', '-'"),
                    );
                }
                match kind {
                    "webhook" => Action::Webhook(arg.to_owned()),
                    "nats" => Action::Nats(arg.to_owned()),
                    _ => Action::Job(arg.to_owned()),
                }
            }
            other => {
                return err(
                    at,
                    format!("unknown action {other:?}; alert, command, tag, webhook, nats or job"),
                )
            }
        };
        if out.len() == ACTIONS_MAX {
            return err(at, format!("at most {ACTIONS_MAX} actions"));
        }
        out.push(action);
    }
    Ok(out)
}

/// `600000` → `10m`: the largest unit that divides it.
pub(crate) fn duration_text(ms: u64) -> String {
    for (unit, n) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= n && ms.is_multiple_of(n) {
            return format!("{}{unit}", ms / n);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses_and_prints_back() {
        for text in [
            "battery < 15 for 10m",
            "battery < 15",
            "temp >= 80.5",
            "rssi != -90",
            "rate(battery, 1h) < -5",
            "no telemetry for 30m",
            "no temp for 2h",
            "on update_rolled_back",
            "count(disconnected, 1h) > 3",
            "battery.v <= 3.3 for 90s",
        ] {
            let c = Condition::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.to_string(), text);
        }
        assert_eq!(
            Condition::parse("battery<15 for 10m"),
            Condition::parse("battery < 15 for 10m")
        );
        assert_eq!(
            Condition::parse("battery < 15 for 600s").map(|c| c.to_string()),
            Ok("battery < 15 for 10m".to_owned())
        );
    }

    #[test]
    fn errors_name_the_column() {
        let cases = [
            ("battery < fifteen", 11, "expected a number"),
            ("battery = 15", 9, "not an operator"),
            ("battery < 15 for 10x", 18, "unit"),
            ("battery < 15 for", 17, "ended early"),
            ("battery < 15 and temp > 3", 14, "unexpected text"),
            ("rate(battery 1h) < 3", 14, "','"),
            ("count(reboots, 1h) > 3", 7, "unknown event"),
            ("count(disconnected, 1h) > 2.5", 27, "whole number"),
            ("on fire", 4, "unknown event"),
            ("1battery < 3", 1, "not a metric name"),
            ("", 1, "empty"),
            ("battery < nan", 11, "expected a number"),
            ("battery < inf", 11, "expected a number"),
            ("battery < 15 for 31d", 18, "30 days"),
            ("< 15", 1, "expected a metric name"),
        ];
        for (text, column, needle) in cases {
            let e = Condition::parse(text).expect_err(text);
            assert_eq!(e.column, column, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
        let long = format!("battery < {}", "1".repeat(RULE_TEXT_LEN_MAX));
        assert!(Condition::parse(&long).is_err());
    }

    #[test]
    fn actions_parse_and_refuse_with_columns() {
        assert_eq!(
            parse_actions("alert:warning, command:diagnostics,tag:needs=battery,webhook:ops,nats:fleet.alerts,job:report"),
            Ok(vec![
                Action::Alert(Severity::Warning),
                Action::Command("diagnostics".into()),
                Action::Tag {
                    key: "needs".into(),
                    value: "battery".into()
                },
                Action::Webhook("ops".into()),
                Action::Nats("fleet.alerts".into()),
                Action::Job("report".into()),
            ])
        );
        let cases = [
            ("alert:loud", 7, "severity"),
            ("alert:warning,page:ops", 15, "unknown action"),
            ("command:mooring.update", 9, "command name"),
            ("tag:needs", 5, "tag:key=value"),
            ("tag:a=b c", 5, "tag value"),
            ("webhook:", 9, "1-128"),
            ("alert", 1, "kind:argument"),
        ];
        for (text, column, needle) in cases {
            let e = parse_actions(text).expect_err(text);
            assert_eq!(e.column, column, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
        let many = ["alert:info"; ACTIONS_MAX + 1].join(",");
        assert!(parse_actions(&many).is_err());
    }
}
