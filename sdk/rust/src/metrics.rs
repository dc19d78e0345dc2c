//! The `metrics` capability: counters and histograms exported by the node
//! as `breakwater_plugin_<name>{plugin="…", …}`.

use crate::bindings::breakwater::plugin::metrics as abi;

fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Adds `value` to counter `name` with these labels.
pub fn counter_add(name: &str, value: u64, labels: &[(&str, &str)]) {
    abi::counter_add(name, value, &owned(labels));
}

/// Records `value` in histogram `name` with these labels.
pub fn histogram_observe(name: &str, value: f64, labels: &[(&str, &str)]) {
    abi::histogram_observe(name, value, &owned(labels));
}
