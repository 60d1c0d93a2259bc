//! Subject, filter and queue-name validation, and filter matching (NATS rules).

use crate::BusError;

/// Longest subject or filter, in bytes (before the bus's prefix is added).
pub const SUBJECT_BYTES_MAX: usize = 256;
/// Longest queue name, in bytes.
pub const QUEUE_NAME_BYTES_MAX: usize = 64;
/// Longest bus prefix, in bytes.
pub const PREFIX_BYTES_MAX: usize = 32;

/// Checks a subject a message is published on: dot-separated, non-empty tokens of printable
/// ASCII without spaces, no wildcards.
pub fn validate_subject(subject: &str) -> Result<(), BusError> {
    validate_tokens(subject, false)
}

/// Checks a subscription filter: a subject whose tokens may be `*` (exactly one token) or, as
/// the last token, `>` (one or more tokens).
pub fn validate_filter(filter: &str) -> Result<(), BusError> {
    validate_tokens(filter, true)
}

fn validate_tokens(s: &str, wildcards: bool) -> Result<(), BusError> {
    let bad = |reason| {
        Err(BusError::InvalidSubject {
            subject: s.to_owned(),
            reason,
        })
    };
    if s.is_empty() {
        return bad("empty");
    }
    if s.len() > SUBJECT_BYTES_MAX {
        return bad("longer than 256 bytes");
    }
    let mut tokens = s.split('.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return bad("empty token");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("only printable ASCII without spaces is allowed");
        }
        match token {
            "*" if wildcards => {}
            ">" if wildcards && tokens.peek().is_none() => {}
            ">" if wildcards => return bad("`>` must be the last token"),
            "*" | ">" => return bad("wildcards are allowed only in subscription filters"),
            _ if token.contains(['*', '>']) => return bad("a wildcard must be a whole token"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a work-queue name: 1 to 64 bytes of `[A-Za-z0-9_-]` (it becomes part of NATS
/// subject and stream names).
pub fn validate_queue(queue: &str) -> Result<(), BusError> {
    validate_name(queue, QUEUE_NAME_BYTES_MAX)
}

/// Checks a bus prefix: 1 to 32 bytes of `[A-Za-z0-9-]`. No `_`: NATS stream names are
/// `<prefix>_q_<queue>`, so the first `_` ends the prefix and no prefix's names can be
/// mistaken for another's (`mooring` never owns `mooring-t1`'s or `mooring_x`'s streams).
pub fn validate_prefix(prefix: &str) -> Result<(), BusError> {
    if prefix.contains('_') {
        return Err(BusError::InvalidQueue {
            queue: prefix.to_owned(),
            reason: "a prefix may not contain `_`",
        });
    }
    validate_name(prefix, PREFIX_BYTES_MAX)
}

fn validate_name(name: &str, bytes_max: usize) -> Result<(), BusError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > bytes_max {
        "too long"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        "only A-Z, a-z, 0-9, `_` and `-` are allowed"
    } else {
        return Ok(());
    };
    Err(BusError::InvalidQueue {
        queue: name.to_owned(),
        reason,
    })
}

/// Whether a valid `filter` matches a valid `subject`.
pub fn filter_matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for f in filter.split('.') {
        if f == ">" {
            return subject.next().is_some();
        }
        match subject.next() {
            Some(s) if f == "*" || f == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_filters_follow_nats_rules() {
        for ok in ["a", "a.b", "presence.dev-1", "x_y.Z9:~"] {
            assert_eq!(validate_subject(ok), Ok(()), "{ok}");
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for ok in ["*", ">", "a.*", "a.>", "*.b.>"] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
            assert!(validate_subject(ok).is_err(), "{ok}");
        }
        let long = "a".repeat(SUBJECT_BYTES_MAX + 1);
        for bad in [
            "", ".", "a.", ".a", "a..b", "a b", "a\tb", "é", "a.>.b", "a*", "a.b>", &long,
        ] {
            assert!(validate_filter(bad).is_err(), "{bad:?}");
            assert!(validate_subject(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn queue_names_are_plain_tokens() {
        assert_eq!(validate_queue("node-1_cmds"), Ok(()));
        assert_eq!(validate_prefix("mooring-t1"), Ok(()));
        assert!(validate_prefix("mooring_t1").is_err());
        for bad in [
            "",
            "a.b",
            "a b",
            "a*",
            ">",
            &"q".repeat(QUEUE_NAME_BYTES_MAX + 1),
        ] {
            assert!(
                matches!(validate_queue(bad), Err(BusError::InvalidQueue { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn wildcards_match_one_token_or_the_rest() {
        let cases = [
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.b.c", false),
            ("a.*", "a", false),
            ("a.>", "a", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c", true),
            (">", "a", true),
            ("*", "a.b", false),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.b", false),
        ];
        for (filter, subject, want) in cases {
            assert_eq!(
                filter_matches(filter, subject),
                want,
                "{filter} vs {subject}"
            );
        }
    }
}

/// A URL (or libpq `key=value` string) fit for logs and error messages: user info (`user:pass@`,
/// `token@`) and password-like query or key=value parameters replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{}***@{}", &url[..scheme_end + 3], &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    };
    for key in ["password", "pass", "token", "sslpassword"] {
        for sep in ["?", "&", " ", ""] {
            let needle = format!("{sep}{key}=");
            let mut from = 0;
            while let Some(i) = out[from..].find(&needle) {
                let start = from + i + needle.len();
                if sep.is_empty()
                    && start > needle.len()
                    && !out[..start - needle.len()].ends_with(['?', '&', ' '])
                {
                    from = start;
                    continue;
                }
                let end = out[start..]
                    .find(['&', ' ', '#'])
                    .map_or(out.len(), |e| start + e);
                out.replace_range(start..end, "***");
                from = start + 3;
            }
        }
    }
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn credentials_never_survive() {
        for (url, want) in [
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://alice:hunter2@h:4222", "nats://***@h:4222"),
            ("nats://s3cr3ttoken@h:4222", "nats://***@h:4222"),
            (
                "postgres://u:pw@db/x?sslmode=require&password=pw2",
                "postgres://***@db/x?sslmode=require&password=***",
            ),
            (
                "postgres://db/x?password=pw",
                "postgres://db/x?password=***",
            ),
            (
                "host=db user=u password=pw dbname=x",
                "host=db user=u password=*** dbname=x",
            ),
            ("password=pw host=db", "password=*** host=db"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
