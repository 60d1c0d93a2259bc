//! Subscription index: a topic-level trie from filter to subscribers, so matching a topic costs O(levels × matches), not O(sessions).
//!
//! Each node is one filter level. It has a map of exact next levels, an optional `+` child, the
//! subscriptions whose filter ends at this node and those whose filter ends with `#` right after
//! it (`a/#` lives on node `a` and matches `a` itself and everything below). Matching walks the
//! topic's levels, following at each node the exact child and the `+` child and collecting the
//! `#` set on the way: the work is bounded by the nodes the topic can reach, whatever the number
//! of sessions.
//!
//! Nodes live in an arena (`Vec`) addressed by index, with a free list, so insert, remove,
//! match and drop are all loops: a filter with thousands of levels (allowed by MQTT, bounded only
//! by the packet size) never recurses on the stack. Removing the last subscription of a branch
//! frees its now-empty nodes up to the first one still in use, so the index holds exactly the
//! nodes its live subscriptions need ([`SubIndex::node_count`] is 0 when it is empty).
//!
//! Semantics are exactly those of [`mooring_proto::topic::filter_matches`] (the property tests
//! in this file check that against random filters and topics): a level is compared literally
//! unless it is exactly `+` (one level) or `#` (the rest, including none; anything after a `#` is
//! ignored, as `filter_matches` does), and a topic starting with `$` is not matched by a filter
//! whose first level is `+` or `#`.

use std::collections::HashMap;
use std::hash::Hash;

type NodeId = u32;
const ROOT: NodeId = 0;

struct Node<K, V> {
    /// Exact next levels.
    children: HashMap<Box<str>, NodeId>,
    /// `+` as the next level.
    plus: Option<NodeId>,
    /// Subscriptions whose filter ends at this node.
    exact: HashMap<K, V>,
    /// Subscriptions whose filter is this node's path followed by `#`.
    hash: HashMap<K, V>,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            exact: HashMap::new(),
            hash: HashMap::new(),
        }
    }

    fn is_unused(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.hash.is_empty()
    }
}

/// Filter → `(key, value)` subscriptions, one value per `(filter, key)`. The broker uses the
/// session id as key and the session plus its subscription options as value.
pub(crate) struct SubIndex<K, V> {
    nodes: Vec<Node<K, V>>,
    free: Vec<NodeId>,
    len: usize,
    /// Bumped on every change; see [`SubIndex::generation`].
    generation: u64,
}

impl<K: Copy + Eq + Hash, V> Default for SubIndex<K, V> {
    fn default() -> Self {
        SubIndex {
            nodes: vec![Node::new()],
            free: Vec::new(),
            len: 0,
            generation: 0,
        }
    }
}

/// The next level of `rest` and what follows it (`None`: that was the last level).
fn split_level(rest: &str) -> (&str, Option<&str>) {
    match rest.split_once('/') {
        Some((level, next)) => (level, Some(next)),
        None => (rest, None),
    }
}

impl<K: Copy + Eq + Hash, V> SubIndex<K, V> {
    /// Number of subscriptions (distinct `(filter, key)` pairs).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Nodes in use besides the root (0 when the index is empty: nothing leaks).
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len() - 1
    }

    /// A counter bumped by every insert and remove, so a reader that released the index can tell
    /// whether a key's subscriptions changed after it looked (the broker records the generation
    /// of each session's last change).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    fn node(&self, id: NodeId) -> &Node<K, V> {
        &self.nodes[id as usize]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node<K, V> {
        &mut self.nodes[id as usize]
    }

    fn alloc(&mut self) -> NodeId {
        if let Some(id) = self.free.pop() {
            return id;
        }
        // The index is bounded by sessions × subscriptions_per_session_max × filter levels,
        // far below u32::MAX nodes for any memory this process can have.
        let id = NodeId::try_from(self.nodes.len()).expect("subscription index below 2^32 nodes");
        self.nodes.push(Node::new());
        id
    }

    fn release(&mut self, id: NodeId) {
        debug_assert!(id != ROOT && self.node(id).is_unused());
        // Replace rather than keep: give the node's map allocations back.
        *self.node_mut(id) = Node::new();
        self.free.push(id);
    }

    /// Insert or replace `key`'s subscription to `filter`; returns the value it replaced.
    pub(crate) fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut id = ROOT;
        let mut rest = Some(filter);
        let mut to_hash = false;
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            rest = next;
            if level == "#" {
                to_hash = true;
                break;
            }
            let existing = if level == "+" {
                self.node(id).plus
            } else {
                self.node(id).children.get(level).copied()
            };
            id = match existing {
                Some(child) => child,
                None => {
                    let child = self.alloc();
                    if level == "+" {
                        self.node_mut(id).plus = Some(child);
                    } else {
                        self.node_mut(id).children.insert(level.into(), child);
                    }
                    child
                }
            };
        }
        let node = self.node_mut(id);
        let prev = if to_hash {
            node.hash.insert(key, value)
        } else {
            node.exact.insert(key, value)
        };
        if prev.is_none() {
            self.len += 1;
        }
        self.generation += 1;
        prev
    }

    /// Remove `key`'s subscription to `filter` (and the nodes only it used); returns its value.
    pub(crate) fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        // Walk down, remembering each (parent, level) edge taken.
        let mut path: Vec<(NodeId, &str)> = Vec::new();
        let mut id = ROOT;
        let mut rest = Some(filter);
        let mut in_hash = false;
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            rest = next;
            if level == "#" {
                in_hash = true;
                break;
            }
            let child = if level == "+" {
                self.node(id).plus
            } else {
                self.node(id).children.get(level).copied()
            }?;
            path.push((id, level));
            id = child;
        }
        let node = self.node_mut(id);
        let value = if in_hash {
            node.hash.remove(key)
        } else {
            node.exact.remove(key)
        }?;
        self.len -= 1;
        self.generation += 1;
        // Free the now-unused tail of the path, bottom up.
        while let Some((parent, level)) = path.pop() {
            if !self.node(id).is_unused() {
                break;
            }
            let p = self.node_mut(parent);
            if level == "+" {
                p.plus = None;
            } else {
                p.children.remove(level);
            }
            self.release(id);
            id = parent;
        }
        debug_assert!(
            self.len != 0 || self.node_count() == 0,
            "empty index holds nodes"
        );
        Some(value)
    }

    /// Call `f` for every subscription whose filter matches `topic` (a key with several matching
    /// filters is reported once per filter).
    pub(crate) fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        // `$` topics: no leading `+` / `#` (MQTT 3.1.1 §4.7.2, v5 §4.7.2).
        let dollar = topic.starts_with('$');
        // (node, rest of the topic after the levels consumed to reach it). Depth-first; the stack
        // holds at most two entries per trie level.
        let mut stack: Vec<(NodeId, Option<&str>)> = vec![(ROOT, Some(topic))];
        while let Some((id, rest)) = stack.pop() {
            let node = self.node(id);
            let wildcards = !(dollar && id == ROOT);
            if wildcards {
                node.hash.iter().for_each(|(k, v)| f(k, v));
            }
            let Some(r) = rest else {
                node.exact.iter().for_each(|(k, v)| f(k, v));
                continue;
            };
            let (level, next) = split_level(r);
            if let Some(&child) = node.children.get(level) {
                stack.push((child, next));
            }
            if let (Some(plus), true) = (node.plus, wildcards) {
                stack.push((plus, next));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooring_proto::topic::filter_matches;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    fn matches(index: &SubIndex<u32, String>, topic: &str) -> BTreeSet<(u32, String)> {
        let mut out = BTreeSet::new();
        index.for_each_match(topic, |k, filter| {
            out.insert((*k, filter.clone()));
        });
        out
    }

    /// Small alphabets so filters and topics collide often.
    const LEVELS: &[&str] = &["a", "b", "devices", "d1", "", "$SYS", "$x", "x+", "#x"];

    fn random_filter(rng: &mut StdRng) -> String {
        let n = rng.random_range(1..=5);
        let mut levels: Vec<&str> = Vec::with_capacity(n);
        for i in 0..n {
            let last = i + 1 == n;
            let roll = rng.random_range(0..10);
            levels.push(if roll < 2 {
                "+"
            } else if roll < 3 && last {
                "#"
            } else {
                LEVELS[rng.random_range(0..LEVELS.len())]
            });
        }
        levels.join("/")
    }

    fn random_topic(rng: &mut StdRng) -> String {
        let n = rng.random_range(1..=6);
        (0..n)
            .map(|_| LEVELS[rng.random_range(0..LEVELS.len())])
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn matches_exactly_what_filter_matches_says_for_random_filters_and_topics() {
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut index: SubIndex<u32, String> = SubIndex::default();
            // Oracle: the same subscriptions as a flat list.
            let mut subs: BTreeSet<(u32, String)> = BTreeSet::new();
            for _ in 0..rng.random_range(1..60) {
                let key = rng.random_range(0..12u32);
                let filter = random_filter(&mut rng);
                index.insert(&filter, key, filter.clone());
                subs.insert((key, filter));
            }
            // Remove some again, so pruned branches are exercised too.
            let all: Vec<(u32, String)> = subs.iter().cloned().collect();
            for (key, filter) in all {
                if rng.random_bool(0.3) {
                    assert_eq!(index.remove(&filter, &key).as_ref(), Some(&filter));
                    subs.remove(&(key, filter));
                }
            }
            assert_eq!(index.len(), subs.len(), "seed {seed}");
            for _ in 0..100 {
                let topic = random_topic(&mut rng);
                let want: BTreeSet<(u32, String)> = subs
                    .iter()
                    .filter(|(_, f)| filter_matches(f, &topic))
                    .cloned()
                    .collect();
                assert_eq!(
                    matches(&index, &topic),
                    want,
                    "seed {seed}, topic {topic:?}"
                );
            }
        }
    }

    #[test]
    fn edge_cases_agree_with_filter_matches() {
        let filters = [
            "#", "+", "+/#", "a/#", "a/+", "a//b", "a/+/#", "/#", "+/+", "", "$SYS/#", "$SYS/+",
            "a/#/b", "+a", "a/b", "a/b/",
        ];
        let topics = [
            "", "a", "a/", "a/b", "a//b", "/", "/a", "$SYS", "$SYS/x", "$SYS/x/y", "a/b/c", "+a",
            "a/b/", "a/+", "a/#",
        ];
        let mut index: SubIndex<u32, String> = SubIndex::default();
        for (k, f) in filters.iter().enumerate() {
            index.insert(f, k as u32, f.to_string());
        }
        for t in topics {
            let want: BTreeSet<(u32, String)> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| filter_matches(f, t))
                .map(|(k, f)| (k as u32, f.to_string()))
                .collect();
            assert_eq!(matches(&index, t), want, "topic {t:?}");
        }
    }

    #[test]
    fn removing_every_subscription_frees_every_node() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut index: SubIndex<u32, String> = SubIndex::default();
        let mut subs = Vec::new();
        for key in 0..500u32 {
            for _ in 0..3 {
                let f = random_filter(&mut rng);
                if index.insert(&f, key, f.clone()).is_none() {
                    subs.push((key, f));
                }
            }
        }
        assert_eq!(index.len(), subs.len());
        assert!(index.node_count() > 0);
        // Removing what is not there changes nothing.
        assert_eq!(index.remove("no/such/filter", &0), None);
        assert_eq!(index.remove(&subs[0].1, &9999), None);
        for (key, f) in &subs {
            assert!(index.remove(f, key).is_some(), "{key} {f}");
        }
        assert_eq!(index.len(), 0);
        assert_eq!(index.node_count(), 0);
        // Freed nodes are reused.
        let arena = index.nodes.len();
        for (key, f) in &subs {
            index.insert(f, *key, f.clone());
        }
        assert_eq!(index.nodes.len(), arena);
    }

    #[test]
    fn replacing_a_subscription_keeps_one_entry_with_the_new_value() {
        let mut index: SubIndex<u32, String> = SubIndex::default();
        assert_eq!(index.insert("a/+", 1, "old".into()), None);
        assert_eq!(index.insert("a/+", 1, "new".into()).as_deref(), Some("old"));
        assert_eq!(index.len(), 1);
        assert_eq!(
            matches(&index, "a/x"),
            BTreeSet::from([(1, "new".to_string())])
        );
    }

    #[test]
    fn very_deep_filters_do_not_recurse() {
        let deep = vec!["l"; 30_000].join("/");
        let mut index: SubIndex<u32, ()> = SubIndex::default();
        index.insert(&deep, 1, ());
        index.insert(&format!("{deep}/#"), 2, ());
        let mut hits = Vec::new();
        index.for_each_match(&deep, |k, _| hits.push(*k));
        hits.sort_unstable();
        assert_eq!(hits, vec![1, 2]);
        assert!(index.remove(&deep, &1).is_some());
        assert!(index.remove(&format!("{deep}/#"), &2).is_some());
        assert_eq!(index.node_count(), 0);
    }
}
