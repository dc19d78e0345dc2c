//! The `log` capability: lines in the node's log, tagged with the plugin.

use crate::bindings::breakwater::plugin::log as abi;

pub use abi::Level;

/// Writes `message` at `level`.
pub fn log(level: Level, message: &str) {
    abi::log(level, message);
}

/// Writes `message` at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Writes `message` at info level.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Writes `message` at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Writes `message` at error level.
pub fn error(message: &str) {
    log(Level::Error, message);
}
