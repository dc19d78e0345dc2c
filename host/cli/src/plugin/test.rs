//! `breakwater plugin test`: one component, loaded into a real sandbox as a
//! node would load it, called with each case of a request file in order.
//!
//! The cases share the sandbox, so state a plugin keeps in `kv` or
//! `counters` carries from one case to the next: a file can drain a token
//! bucket and then expect the 429.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use breakwater_sandbox::{
    Capability, Limits, LoadError, LoadedPlugin, Phases, PluginSpec, RequestDecision, Sandbox,
    SandboxConfig, sha256_hex,
};
use serde::Serialize;
use serde_json::Value;

use super::cases::{Case, DecisionKind, Outcome};
use super::{Grant, Located, TestArgs};

/// Exit status when an expectation fails (or a call fails unexpected).
const FAILED: u8 = 1;
/// Exit status for input that cannot be run: files, JSON, configuration.
const BAD_INPUT: u8 = 2;

pub(crate) fn run(args: &TestArgs) -> ExitCode {
    match run_cases(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(FAILED),
        Err(error) => {
            // A located error already reads `file:line:column: error: …`.
            match error.downcast_ref::<Located>() {
                Some(located) => eprintln!("{located}"),
                None => eprintln!("error: {error:#}"),
            }
            ExitCode::from(BAD_INPUT)
        }
    }
}

/// Runs every case; `Ok(false)` when any expectation failed, `Err` for
/// input that could not be run at all.
fn run_cases(args: &TestArgs) -> anyhow::Result<bool> {
    let cases = read_cases(&args.request)?;
    let config = match &args.config {
        Some(path) => read_config(path)?,
        // What the node hands a plugin whose section has no `config`.
        None => "{}".to_owned(),
    };
    let plugin = load(args, config)?;

    let file = args.request.display();
    let mut failed = 0;
    let mut stdout = std::io::stdout().lock();
    for (index, case) in cases.iter().enumerate() {
        let number = index + 1;
        let label = match &case.name {
            Some(name) => format!("{file}: case {number} ({name})"),
            None => format!("{file}: case {number}"),
        };
        let (line, problems) = run_case(&plugin, case, number);
        writeln!(stdout, "{line}").context("writing to stdout")?;
        if !problems.is_empty() {
            failed += 1;
            for problem in problems {
                eprintln!("FAIL {label}: {problem}");
            }
        }
    }
    stdout.flush().context("writing to stdout")?;
    eprintln!(
        "{file}: {} case(s), {} passed, {failed} failed",
        cases.len(),
        cases.len() - failed
    );
    Ok(failed == 0)
}

/// Runs one case: its printed line, and what did not hold.
fn run_case(plugin: &LoadedPlugin, case: &Case, number: usize) -> (String, Vec<String>) {
    let mut problems = Vec::new();
    let mut request = match case.request(number) {
        Ok(request) => request,
        // `read_cases` refuses such a case before anything runs.
        Err(problem) => return (String::new(), vec![problem]),
    };
    let mut view = request.view();
    let mut context = None;
    // Like the node: a phase the plugin does not implement is not called.
    let on_request = if !plugin.phases().contains(Phases::REQUEST) {
        Outcome::of_request(RequestDecision::Continue)
    } else {
        match plugin.on_request(&view) {
            Ok(outcome) => {
                if let RequestDecision::ContinueWith(changes) = &outcome.decision {
                    // `on-response` sees the request as the chain left it.
                    request.apply(changes);
                    view = request.view();
                }
                context = outcome.context;
                Outcome::of_request(outcome.decision)
            }
            Err(error) => Outcome::failed(&error),
        }
    };
    let expect = case.expect.as_ref();
    match expect {
        Some(expect) => problems.extend(
            expect
                .mismatches(&on_request)
                .into_iter()
                .map(|m| format!("on-request: {m}")),
        ),
        None => problems.extend(unexpected_failure("on-request", &on_request)),
    }

    // Like the node: an answered or failed request never reaches upstream,
    // so there is no response for `on-response` to see.
    let answered = matches!(
        on_request.kind(),
        DecisionKind::Respond | DecisionKind::Failed
    );
    let responds = plugin.phases().contains(Phases::RESPONSE);
    let on_response = match &case.response {
        Some(head) if !answered && responds => {
            let head = breakwater_sandbox::ResponseHead {
                status: head.status,
                headers: head.headers.0.clone(),
            };
            Some(match plugin.on_response(&view, &head, context.as_deref()) {
                Ok(decision) => Outcome::of_response(decision),
                Err(error) => Outcome::failed(&error),
            })
        }
        _ => None,
    };
    match (expect.and_then(|e| e.on_response()), &on_response) {
        (Some(expected), Some(outcome)) => problems.extend(
            expected
                .mismatches(outcome)
                .into_iter()
                .map(|m| format!("on-response: {m}")),
        ),
        (Some(_), None) if case.response.is_none() => problems.push(
            "on-response: expectations given, but the case has no `response` to run it on"
                .to_owned(),
        ),
        (Some(_), None) if !responds => problems.push(
            "on-response: expectations given, but the plugin has no response phase".to_owned(),
        ),
        (Some(_), None) => problems.push(format!(
            "on-response: did not run, because on-request decided {}",
            on_request.kind().name()
        )),
        (None, Some(outcome)) => problems.extend(unexpected_failure("on-response", outcome)),
        (None, None) => {}
    }

    let line = Line {
        case: number,
        name: case.name.as_deref(),
        on_request: &on_request,
        on_response: on_response.as_ref(),
    };
    // A line is strings, numbers and maps with string keys: it always
    // serializes.
    let line = serde_json::to_string(&line).unwrap_or_default();
    (line, problems)
}

/// The printed line of one case. A struct rather than a JSON map keeps the
/// fields in this order, the decision first, instead of sorted.
#[derive(Serialize)]
struct Line<'c> {
    case: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'c str>,
    on_request: &'c Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    on_response: Option<&'c Outcome>,
}

/// A failed call is a failed case unless the case expected it: the node
/// would have answered 500 or skipped the plugin.
fn unexpected_failure(phase: &str, outcome: &Outcome) -> Option<String> {
    (outcome.kind() == DecisionKind::Failed).then(|| {
        format!(
            "{phase}: the call failed ({}): {}",
            outcome.failure.unwrap_or("unknown"),
            outcome.message.as_deref().unwrap_or("")
        )
    })
}

/// The cases of a request file: one case object, or an array of them.
fn read_cases(path: &Path) -> anyhow::Result<Vec<Case>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Chosen by the first character rather than by an untagged enum, whose
    // errors say only "did not match any variant" and lose the field at
    // fault.
    let cases = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<Case>>(&text)
    } else {
        serde_json::from_str::<Case>(&text).map(|case| vec![case])
    }
    .map_err(|e| Located::json(path, &e))?;
    if cases.is_empty() {
        bail!("{}: no cases: the array is empty", path.display());
    }
    for (index, case) in cases.iter().enumerate() {
        if let Some(problem) = case.problem() {
            bail!("{}: case {}: {problem}", path.display(), index + 1);
        }
    }
    Ok(cases)
}

/// The configuration as the JSON text the plugin's `init` receives; a TOML
/// file is converted the way the node converts a `[[plugin]]` section's
/// `config` table.
fn read_config(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = if path.extension().is_some_and(|e| e == "toml") {
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| Located::toml(path, &text, &e))?;
        serde_json::to_value(table)
            .with_context(|| format!("{}: converting to JSON", path.display()))?
    } else {
        serde_json::from_str(&text).map_err(|e| Located::json(path, &e))?
    };
    Ok(value.to_string())
}

/// Loads the component into a fresh sandbox, pinned to its own digest: it
/// is the author's local build, which nothing else could vouch for.
fn load(args: &TestArgs, config: String) -> anyhow::Result<LoadedPlugin> {
    let bytes = std::fs::read(&args.plugin)
        .with_context(|| format!("reading the plugin {}", args.plugin.display()))?;
    let limits = Limits {
        cpu_deadline: Duration::from_millis(args.cpu_deadline_ms),
        ..Limits::default()
    };
    let sandbox = Sandbox::new(SandboxConfig {
        // Calls run one at a time here; a small pool reserves less memory.
        max_concurrent_instances: 4,
        default_limits: limits,
        ..SandboxConfig::default()
    })
    .context("starting the sandbox")?;
    let mut grants = BTreeSet::new();
    for grant in &args.grant {
        match grant {
            Grant::One(capability) => {
                grants.insert(*capability);
            }
            Grant::All => grants.extend(Capability::ALL),
        }
    }
    let mut spec = PluginSpec::new(plugin_name(&args.plugin), &args.plugin, sha256_hex(&bytes));
    spec.config = config;
    spec.grants = grants;
    sandbox.load(spec).map_err(|error| match &error {
        LoadError::NotGranted { capability, .. } => {
            anyhow::anyhow!("{error} (here: pass --grant {capability})")
        }
        _ => anyhow::Error::new(error),
    })
}

/// A valid plugin name from the component's file name (`rate_limit.wasm`
/// is `rate_limit`): it names the plugin's metrics and kv namespace.
fn plugin_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "plugin".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_come_from_the_file_name() {
        assert_eq!(plugin_name(Path::new("x/rate_limit.wasm")), "rate_limit");
        assert_eq!(plugin_name(Path::new("My Plugin.wasm")), "my-plugin");
        assert_eq!(plugin_name(Path::new("")), "plugin");
    }
}
