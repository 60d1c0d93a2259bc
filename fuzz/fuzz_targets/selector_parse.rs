//! Fuzz target: fleet selector parsing (`Selector::parse`) and evaluation (`Selector::matches`).
//!
//! Input: selector text up to the first NUL byte (so seeds are plain selectors); the bytes after
//! it describe a device (id, tags, online, version) through `arbitrary`. Checks, for every
//! selector that parses:
//! * `Display` gives text that parses back to the same selector;
//! * a device built to satisfy every term (first candidate id, each tag, the version, online)
//!   matches exactly when the terms do not contradict each other;
//! * for the fuzzed device: a match implies its id is among `id_candidates()`, and the version
//!   matters only when `needs_version()`.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use mooring_proto::selector::{DeviceFacts, Selector, Term};
use std::collections::BTreeMap;

#[derive(Arbitrary, Debug)]
struct Device {
    id: String,
    tags: Vec<(String, String)>,
    online: bool,
    version: Option<String>,
}

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(sel) = Selector::parse(text) else {
        return;
    };
    assert!(!sel.terms.is_empty());

    let shown = sel.to_string();
    let reparsed = Selector::parse(&shown).unwrap_or_else(|e| panic!("{shown:?}: {e}"));
    assert_eq!(reparsed, sel, "{shown:?}");

    satisfying_device_matches(&sel);

    let Ok(dev) = Device::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let tags: BTreeMap<String, String> = dev.tags.into_iter().collect();
    let facts = DeviceFacts {
        id: &dev.id,
        tags: &tags,
        online: dev.online,
        version: dev.version.as_deref(),
    };
    let matched = sel.matches(&facts);
    if matched {
        if let Some(ids) = sel.id_candidates() {
            assert!(ids.iter().any(|i| i.as_str() == dev.id), "{shown:?}");
        }
    }
    if !sel.needs_version() {
        for version in [None, Some("1.0.0")] {
            assert_eq!(sel.matches(&DeviceFacts { version, ..facts }), matched);
        }
    }
});

/// Builds the device every term asks for; it must match unless two terms contradict each other
/// (disjoint id lists, one tag key with two values, two versions).
fn satisfying_device_matches(sel: &Selector) {
    let mut tags = BTreeMap::new();
    let mut version: Option<&str> = None;
    let mut consistent = true;
    for term in &sel.terms {
        match term {
            Term::Tag { key, value } => {
                if let Some(old) = tags.insert(key.clone(), value.clone()) {
                    consistent &= &old == value;
                }
            }
            Term::Version(v) => {
                consistent &= version.is_none_or(|old| old == v);
                version = Some(v);
            }
            Term::Ids(ids) => assert!(!ids.is_empty()),
            Term::Online => {}
        }
    }
    let candidates = sel.id_candidates();
    let id = match &candidates {
        Some(ids) => match ids.first() {
            Some(id) => id.as_str(),
            None => {
                consistent = false;
                "nobody"
            }
        },
        None => "any-device",
    };
    let facts = DeviceFacts {
        id,
        tags: &tags,
        online: true,
        version,
    };
    assert_eq!(sel.matches(&facts), consistent, "{sel}");
    assert!(
        !sel.matches(&DeviceFacts {
            online: false,
            ..facts
        }) || !sel.terms.contains(&Term::Online)
    );
}
