//! `breakwater plugin …`: the commands for plugin authors. `build` compiles
//! a plugin workspace or crate for `wasm32-wasip2` and prints each
//! component's pin; `test` runs one component against sample requests
//! through the real sandbox, without a node.

mod build;
mod cases;
mod test;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use breakwater_sandbox::Capability;
use clap::{Args, Subcommand};

/// The target plugins are compiled for.
const TARGET: &str = "wasm32-wasip2";

#[derive(Subcommand)]
pub(crate) enum PluginCommand {
    /// Build plugins for wasm32-wasip2 and print each component's size and
    /// sha256 (the value of `sha256` in a `[[plugin]]` section).
    Build {
        /// A plugin workspace or a single plugin crate; by default the
        /// `plugins/` workspace of the checkout around the current directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run one plugin component against sample requests through the real
    /// sandbox; exit 0 when every expectation holds, 1 when one fails, 2 on
    /// bad input.
    Test(TestArgs),
}

#[derive(Args)]
pub(crate) struct TestArgs {
    /// The component (`.wasm`) to run; it is pinned to its own sha256.
    plugin: PathBuf,
    /// A JSON file with one request case or an array of them.
    #[arg(long)]
    request: PathBuf,
    /// The plugin's configuration: a `.json` file, or a `.toml` file holding
    /// what a `[[plugin]]` section's `config` table holds. Default: `{}`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Host capabilities to grant, comma-separated: log, clock, kv,
    /// counters, metrics, or all.
    #[arg(long, value_delimiter = ',', value_parser = parse_grant)]
    grant: Vec<Grant>,
    /// CPU time per call. Generous by default: the node's 2 ms deadline
    /// counts wall time on a loaded machine, and this command checks
    /// behavior, not speed.
    #[arg(long, default_value_t = 1000)]
    cpu_deadline_ms: u64,
}

/// One `--grant` value: a capability, or `all` of them.
#[derive(Clone, Copy, Debug)]
enum Grant {
    One(Capability),
    All,
}

fn parse_grant(name: &str) -> Result<Grant, String> {
    let name = name.trim();
    if name == "all" {
        return Ok(Grant::All);
    }
    Capability::from_name(name).map(Grant::One).ok_or_else(|| {
        format!("unknown capability `{name}`: grants are log, clock, kv, counters, metrics, all")
    })
}

/// Runs a `plugin` subcommand; the exit code is the command's verdict.
pub(crate) fn run(command: PluginCommand) -> ExitCode {
    match command {
        PluginCommand::Build { dir, debug } => match build::run(dir, debug) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        PluginCommand::Test(args) => test::run(&args),
    }
}

/// An input error at a place in a file, printed the way compilers print
/// theirs (`file:line:column: error: …`) so editors can jump to it.
#[derive(Debug)]
pub(crate) struct Located {
    pub(crate) path: PathBuf,
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for Located {}

impl Located {
    /// A serde_json error in `path`, its message without the trailing
    /// "at line L column C", which the location already says.
    pub(crate) fn json(path: &std::path::Path, error: &serde_json::Error) -> Located {
        let (line, column) = (error.line(), error.column());
        let text = error.to_string();
        let suffix = format!(" at line {line} column {column}");
        let message = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
        Located {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    }

    /// A TOML error in `path`, located from its byte span in `text`.
    pub(crate) fn toml(path: &std::path::Path, text: &str, error: &toml::de::Error) -> Located {
        let offset = error.span().map_or(0, |span| span.start.min(text.len()));
        let before = text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(before, |i| &before[i + 1..]);
        Located {
            path: path.to_owned(),
            line,
            column: column.chars().count() + 1,
            message: error.message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_keep_the_message_and_move_the_location_up_front() {
        let error = serde_json::from_str::<serde_json::Value>("{\n  \"a\" 1}").unwrap_err();
        let located = Located::json(std::path::Path::new("r.json"), &error);
        assert_eq!(located.to_string(), "r.json:2:7: error: expected `:`");
    }

    #[test]
    fn toml_errors_are_located_by_their_span() {
        let text = "a = 1\nb = = 2\n";
        let error = toml::from_str::<toml::Table>(text).unwrap_err();
        let located = Located::toml(std::path::Path::new("c.toml"), text, &error);
        assert_eq!((located.line, located.column), (2, 5), "{located}");
    }

    #[test]
    fn grants_parse_by_name_or_all() {
        assert!(matches!(
            parse_grant("counters"),
            Ok(Grant::One(Capability::Counters))
        ));
        assert!(matches!(parse_grant("all"), Ok(Grant::All)));
        assert!(parse_grant("net").is_err_and(|e| e.contains("grants are")));
    }
}
