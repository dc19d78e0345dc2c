//! The `log` capability: plugin log lines go to `tracing`, tagged with the
//! plugin's name.

use crate::bindings::breakwater::plugin::log::{Host, Level};
use crate::host::HostState;

/// Longer messages are cut: a plugin must not be able to flood the log.
const MAX_MESSAGE: usize = 4 * 1024;

fn truncate(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = self.plugin.name.as_str();
        let message = truncate(&message);
        match level {
            Level::Trace => tracing::trace!(target: "breakwater::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "breakwater::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "breakwater::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "breakwater::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "breakwater::plugin", plugin, "{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_MESSAGE);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate("short"), "short");
    }
}
