//! Configuration errors that point at a place in the file and say what to do.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a configuration file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// What the operator should change.
    pub fix: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}\n  fix: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message,
            self.fix
        )
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// The located problems, empty when the file could not be read at all.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(diagnostics) => diagnostics,
        }
    }
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Turns byte offsets of one source text into diagnostics.
pub(crate) struct SourceMap<'a> {
    file: &'a Path,
    text: &'a str,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str) -> Self {
        Self { file, text }
    }

    pub(crate) fn diagnostic(
        &self,
        span: Option<Range<usize>>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Diagnostic {
        let offset = span.map_or(0, |s| s.start.min(self.text.len()));
        let before = &self.text[..floor_char_boundary(self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
            fix: fix.into(),
        }
    }
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The candidate closest to `wrong` by edit distance, if it is plausibly a typo.
pub(crate) fn nearest<'c>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(wrong, c), c))
        .filter(|(distance, c)| *distance <= (c.len().max(wrong.len()) / 2).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// Explains a serde/TOML error message as a fix an operator can apply.
pub(crate) fn fix_for_parse_error(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let names = backticked(rest);
        if let Some((wrong, valid)) = names.split_first() {
            return match nearest(wrong, valid.iter().copied()) {
                Some(near) => format!("replace `{wrong}` with `{near}`"),
                None => format!(
                    "remove `{wrong}`; valid keys here are: {}",
                    valid
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
    }
    if let Some(rest) = message.strip_prefix("missing field ")
        && let Some(name) = backticked(rest).first()
    {
        return format!("add `{name} = …` to this table");
    }
    if message.contains("invalid type")
        && let Some(expected) = message.split("expected ").nth(1)
    {
        return fix_for_expected_type(expected.trim());
    }
    if message.contains("basic string") || message.contains("literal string") {
        return "close the string with its quote before the end of the line".to_owned();
    }
    if message.contains("duration") || message.contains("time unit") {
        return "write a duration such as \"500ms\", \"10s\" or \"2m\"".to_owned();
    }
    "correct the TOML syntax at this position (strings need quotes, tables `[name]`, arrays of tables `[[name]]`)".to_owned()
}

fn fix_for_expected_type(expected: &str) -> String {
    let integer = [
        "u8",
        "u16",
        "u32",
        "u64",
        "usize",
        "i32",
        "i64",
        "an integer",
    ];
    if integer.contains(&expected) {
        "write a whole number without quotes, e.g. 10485760".to_owned()
    } else if expected.contains("bool") {
        "write true or false, without quotes".to_owned()
    } else if expected.contains("string") || expected.contains("path") {
        "write a quoted string, e.g. \"value\"".to_owned()
    } else if expected.contains("sequence") {
        "write an array, e.g. [\"a\", \"b\"]".to_owned()
    } else {
        format!("write {expected} here")
    }
}

fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_suggests_the_nearest_key() {
        let fix = fix_for_parse_error("unknown field `adress`, expected `address` or `tls`");
        assert_eq!(fix, "replace `adress` with `address`");
    }

    #[test]
    fn far_unknown_field_lists_valid_keys() {
        let fix = fix_for_parse_error("unknown field `zzzzzzzz`, expected `address` or `tls`");
        assert_eq!(
            fix,
            "remove `zzzzzzzz`; valid keys here are: `address`, `tls`"
        );
    }

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = 2\n";
        let map = SourceMap::new(Path::new("x.toml"), text);
        let d = map.diagnostic(Some(9..10), "m", "f");
        assert_eq!((d.line, d.column), (2, 4));
    }
}
