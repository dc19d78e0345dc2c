//! The `metrics` capability: plugin metrics through the `metrics` crate, as
//! `breakwater_plugin_<name>{plugin="…", …}`, with bounded label sets.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, PoisonError};

use metrics::Label;

use crate::bindings::breakwater::plugin::metrics::Host;
use crate::host::HostState;

const MAX_NAME: usize = 64;
const MAX_LABELS: usize = 4;
const MAX_LABEL_VALUE: usize = 128;

/// The series (name and label set) one plugin has created; past the limit
/// new series are dropped so a plugin cannot blow up the node's metrics.
#[derive(Debug)]
pub(crate) struct SeriesLimit {
    max: usize,
    hasher: RandomState,
    seen: Mutex<HashSet<u64>>,
}

impl SeriesLimit {
    pub(crate) fn new(max: usize) -> Self {
        SeriesLimit {
            max,
            hasher: RandomState::new(),
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn admit(&self, name: &str, labels: &[(String, String)]) -> bool {
        let id = self.hasher.hash_one((name, labels));
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&id) {
            return true;
        }
        if seen.len() >= self.max {
            return false;
        }
        seen.insert(id)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl HostState {
    /// The full metric name and labels, or none when the plugin asked for
    /// something out of bounds (counted, then dropped).
    fn series(&self, name: &str, labels: Vec<(String, String)>) -> Option<(String, Vec<Label>)> {
        let plugin = &self.plugin.name;
        let admitted = valid_name(name)
            && labels.len() <= MAX_LABELS
            && labels
                .iter()
                .all(|(k, v)| valid_name(k) && k != "plugin" && v.len() <= MAX_LABEL_VALUE)
            && self.plugin.series.admit(name, &labels);
        if !admitted {
            metrics::counter!("breakwater_plugin_metrics_dropped_total", "plugin" => plugin.clone())
                .increment(1);
            return None;
        }
        let mut all = Vec::with_capacity(labels.len() + 1);
        all.push(Label::new("plugin", plugin.clone()));
        all.extend(labels.into_iter().map(|(k, v)| Label::new(k, v)));
        Some((format!("breakwater_plugin_{name}"), all))
    }
}

impl Host for HostState {
    fn counter_add(&mut self, name: String, value: u64, labels: Vec<(String, String)>) {
        if let Some((name, labels)) = self.series(&name, labels) {
            metrics::counter!(name, labels).increment(value);
        }
    }

    fn histogram_observe(&mut self, name: String, value: f64, labels: Vec<(String, String)>) {
        if let Some((name, labels)) = self.series(&name, labels) {
            metrics::histogram!(name, labels).record(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        assert!(valid_name("requests_total"));
        assert!(!valid_name("Requests"));
        assert!(!valid_name("9lives"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn series_are_bounded() {
        let limit = SeriesLimit::new(2);
        let labels = |v: &str| vec![("k".to_owned(), v.to_owned())];
        assert!(limit.admit("m", &labels("a")));
        assert!(limit.admit("m", &labels("b")));
        assert!(
            limit.admit("m", &labels("a")),
            "a known series stays admitted"
        );
        assert!(!limit.admit("m", &labels("c")));
    }
}
