//! Fleet selectors: the one syntax that names a set of devices, parsed and evaluated here.
//!
//! ```text
//! selector := term ( " and " term )*
//! term     := "online"
//!           | "tag:" key "=" value
//!           | "version=" value
//!           | "id:" ids | ids
//! ids      := id ( "," id )*
//! ```
//!
//! Terms are combined with `and` (every term must hold); a device matches an `ids` term if its
//! id is one of them. `version` is the firmware version the device reports in its shadow
//! (reported key `version`). Keys and values are 1-128 characters of letters, digits, `.`, `_`,
//! `-`, `:` (the tag alphabet). Parsing is pure and total: any input gives a selector or a
//! [`SelectorError`] that says what is wrong and where.

use crate::id::DeviceId;
use std::collections::BTreeMap;
use std::fmt;

/// Longest selector text, in bytes (room for [`SELECTOR_IDS_MAX`] ids of 64 characters).
pub const SELECTOR_LEN_MAX: usize = 72 * 1024;
/// Most terms joined by `and`.
pub const SELECTOR_TERMS_MAX: usize = 16;
/// Most device ids in one selector.
pub const SELECTOR_IDS_MAX: usize = 1000;
/// Longest tag key, tag value or version.
pub const SELECTOR_VALUE_LEN_MAX: usize = 128;

/// One condition on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// The device id is one of these.
    Ids(Vec<DeviceId>),
    /// The device carries tag `key` with this value.
    Tag { key: String, value: String },
    /// The device reports this firmware version.
    Version(String),
    /// The device is connected now.
    Online,
}

/// A parsed selector: every term must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub terms: Vec<Term>,
}

/// What a selector is evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts<'a> {
    pub id: &'a str,
    pub tags: &'a BTreeMap<String, String>,
    pub online: bool,
    /// Reported firmware version, if known.
    pub version: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector is empty")]
    Empty,
    #[error("selector is longer than {SELECTOR_LEN_MAX} bytes")]
    TooLong,
    #[error("selector has more than {SELECTOR_TERMS_MAX} terms")]
    TooManyTerms,
    #[error("selector names more than {SELECTOR_IDS_MAX} device ids")]
    TooManyIds,
    #[error("term {index} ({term:?}): {reason}")]
    BadTerm {
        index: usize,
        term: String,
        reason: String,
    },
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
}

/// Checks a tag key, tag value or version against the tag alphabet; `what` names it in the error.
pub fn check_value(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > SELECTOR_VALUE_LEN_MAX || !v.chars().all(is_value_char) {
        return Err(format!(
            "{what} {v:?} must be 1-{SELECTOR_VALUE_LEN_MAX} characters of letters, digits, '.', '_', '-', ':'"
        ));
    }
    Ok(())
}

fn parse_term(text: &str) -> Result<Term, String> {
    if text == "online" {
        return Ok(Term::Online);
    }
    if let Some(rest) = text.strip_prefix("tag:") {
        let (key, value) = rest
            .split_once('=')
            .ok_or_else(|| "a tag term is tag:<key>=<value>".to_owned())?;
        check_value("tag key", key)?;
        check_value("tag value", value)?;
        return Ok(Term::Tag {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    if let Some(v) = text.strip_prefix("version=") {
        check_value("version", v)?;
        return Ok(Term::Version(v.to_owned()));
    }
    let ids_text = text.strip_prefix("id:").unwrap_or(text);
    if ids_text.contains('=') {
        return Err(
            "unknown term; expected online, tag:<key>=<value>, version=<v> or device ids".into(),
        );
    }
    let ids = ids_text
        .split(',')
        .map(|id| DeviceId::parse(id).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Term::Ids(ids))
}

impl Selector {
    /// Parses selector text. Terms are separated by the word `and` surrounded by whitespace.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > SELECTOR_LEN_MAX {
            return Err(SelectorError::TooLong);
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() {
            return Err(SelectorError::Empty);
        }
        let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
        for w in words {
            if w == "and" {
                groups.push(Vec::new());
            } else if let Some(last) = groups.last_mut() {
                last.push(w);
            }
        }
        if groups.len() > SELECTOR_TERMS_MAX {
            return Err(SelectorError::TooManyTerms);
        }
        let mut terms = Vec::with_capacity(groups.len());
        let mut ids_total = 0usize;
        for (index, group) in groups.iter().enumerate() {
            let term_text = group.join(" ");
            let bad = |reason: String| SelectorError::BadTerm {
                index: index + 1,
                term: term_text.clone(),
                reason,
            };
            let term = match group.as_slice() {
                [] => return Err(bad("missing term around `and`".into())),
                [one] => parse_term(one).map_err(bad)?,
                _ => {
                    return Err(bad(
                        "terms are joined with `and`; spaces are not allowed inside a term".into(),
                    ))
                }
            };
            if let Term::Ids(ids) = &term {
                ids_total += ids.len();
                if ids_total > SELECTOR_IDS_MAX {
                    return Err(SelectorError::TooManyIds);
                }
            }
            terms.push(term);
        }
        Ok(Selector { terms })
    }

    /// Does the device match every term?
    pub fn matches(&self, d: &DeviceFacts<'_>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Ids(ids) => ids.iter().any(|i| i.as_str() == d.id),
            Term::Tag { key, value } => d.tags.get(key).is_some_and(|v| v == value),
            Term::Version(v) => d.version == Some(v.as_str()),
            Term::Online => d.online,
        })
    }

    /// The device ids the selector is limited to, if it has an ids term (the intersection of
    /// all of them), sorted and deduplicated: the evaluator looks these up directly instead of
    /// scanning the fleet.
    pub fn id_candidates(&self) -> Option<Vec<DeviceId>> {
        let mut out: Option<Vec<DeviceId>> = None;
        for t in &self.terms {
            if let Term::Ids(ids) = t {
                let mut ids = ids.clone();
                ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                ids.dedup();
                out = Some(match out {
                    None => ids,
                    Some(prev) => prev.into_iter().filter(|p| ids.contains(p)).collect(),
                });
            }
        }
        out
    }

    /// Whether evaluating it needs the reported firmware version.
    pub fn needs_version(&self) -> bool {
        self.terms.iter().any(|t| matches!(t, Term::Version(_)))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            match t {
                Term::Ids(ids) => {
                    let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
                    write!(f, "id:{}", ids.join(","))?;
                }
                Term::Tag { key, value } => write!(f, "tag:{key}={value}")?,
                Term::Version(v) => write!(f, "version={v}")?,
                Term::Online => f.write_str("online")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
        online: bool,
        version: Option<&'a str>,
    ) -> DeviceFacts<'a> {
        DeviceFacts {
            id,
            tags,
            online,
            version,
        }
    }

    #[test]
    fn parses_every_term_kind() {
        let table: &[(&str, Vec<Term>)] = &[
            ("online", vec![Term::Online]),
            (
                "tag:site=berlin",
                vec![Term::Tag {
                    key: "site".into(),
                    value: "berlin".into(),
                }],
            ),
            ("version=1.4.0", vec![Term::Version("1.4.0".into())]),
            (
                "d1,d2",
                vec![Term::Ids(vec![
                    DeviceId::parse("d1").expect("id"),
                    DeviceId::parse("d2").expect("id"),
                ])],
            ),
            (
                "id:online",
                vec![Term::Ids(vec![DeviceId::parse("online").expect("id")])],
            ),
            (
                "  tag:site=berlin   and version=1.3.2 and online ",
                vec![
                    Term::Tag {
                        key: "site".into(),
                        value: "berlin".into(),
                    },
                    Term::Version("1.3.2".into()),
                    Term::Online,
                ],
            ),
        ];
        for (text, terms) in table {
            let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(&s.terms, terms, "{text}");
            // Display is parseable and means the same.
            assert_eq!(
                Selector::parse(&s.to_string()).expect("display reparses"),
                s
            );
        }
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for bad in [
            "",
            "   ",
            "and",
            "online and",
            "and online",
            "online and and online",
            "tag:site",
            "tag:=x",
            "tag:site=",
            "tag:si te=x",
            "tag:site=a/b",
            "tag:site=#",
            "version=",
            "version=1 2",
            "foo=bar",
            "d1,,d2",
            "d1,",
            "-d1",
            "a/b",
            "online or d1",
        ] {
            let e = Selector::parse(bad).expect_err(bad);
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        assert_eq!(
            Selector::parse(&"x".repeat(SELECTOR_LEN_MAX + 1)),
            Err(SelectorError::TooLong)
        );
        let many = vec!["online"; SELECTOR_TERMS_MAX + 1].join(" and ");
        assert_eq!(Selector::parse(&many), Err(SelectorError::TooManyTerms));
        let ids: Vec<String> = (0..=SELECTOR_IDS_MAX).map(|i| format!("d{i}")).collect();
        assert_eq!(
            Selector::parse(&ids.join(",")),
            Err(SelectorError::TooManyIds)
        );
    }

    #[test]
    fn evaluation_is_a_conjunction() {
        let mut tags = BTreeMap::new();
        tags.insert("site".to_owned(), "berlin".to_owned());
        let none = BTreeMap::new();
        let s = Selector::parse("tag:site=berlin and version=1.3.2").expect("valid");
        assert!(s.matches(&facts("d1", &tags, false, Some("1.3.2"))));
        assert!(!s.matches(&facts("d1", &tags, false, Some("1.4.0"))));
        assert!(!s.matches(&facts("d1", &tags, false, None)));
        assert!(!s.matches(&facts("d1", &none, false, Some("1.3.2"))));
        let s = Selector::parse("d1,d2 and online").expect("valid");
        assert!(s.matches(&facts("d2", &none, true, None)));
        assert!(!s.matches(&facts("d2", &none, false, None)));
        assert!(!s.matches(&facts("d3", &none, true, None)));
        assert!(!s.needs_version());
        let s = Selector::parse("d1,d2,d3 and d3,d2,d9").expect("valid");
        let ids: Vec<String> = s
            .id_candidates()
            .expect("ids")
            .into_iter()
            .map(DeviceId::into_string)
            .collect();
        assert_eq!(ids, vec!["d2", "d3"]);
        assert_eq!(
            Selector::parse("online").expect("valid").id_candidates(),
            None
        );
    }

    #[test]
    fn parse_never_panics_on_arbitrary_input() {
        // A cheap deterministic fuzz: every string over a small alphabet up to length 6.
        let alphabet = ['a', 'n', 'd', ' ', ':', '=', ',', 't', 'g', '-', '/', '#'];
        let mut stack = vec![String::new()];
        while let Some(s) = stack.pop() {
            let _ = Selector::parse(&s);
            if s.len() < 5 {
                for c in alphabet {
                    let mut n = s.clone();
                    n.push(c);
                    stack.push(n);
                }
            }
        }
    }
}
