//! `breakwater plugin build` and `breakwater plugin test` through the real
//! binary: the bundled plugins' example request files pass, a wrong
//! expectation exits 1 and names itself, bad input exits 2 with where it is,
//! and a build prints each component's pin.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use breakwater_e2e::{breakwater, workspace_root};
use sha2::{Digest, Sha256};

/// Each bundled example: the plugin's directory, its component's name, and
/// the grants it needs.
const EXAMPLES: &[(&str, &str, &[&str])] = &[
    ("waf", "waf", &[]),
    ("rate-limit", "rate_limit", &["--grant", "counters"]),
    ("router", "router", &[]),
    ("cache-policy", "cache_policy", &[]),
    ("template", "template", &[]),
];

const COMPONENTS: &[&str] = &[
    "waf",
    "rate_limit",
    "router",
    "cache_policy",
    "template",
    "fixture_misbehave",
];

/// The compiled plugin components, built with `breakwater plugin build`
/// when any is missing (`cargo xtask test` builds them beforehand).
fn components() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workspace_root().join("plugins/target/wasm32-wasip2/release");
        if COMPONENTS
            .iter()
            .any(|c| !dir.join(format!("{c}.wasm")).is_file())
        {
            let output = run(&["plugin", "build", "--dir", "plugins"]);
            assert_eq!(output.status.code(), Some(0), "{}", all(&output));
        }
        dir
    })
}

fn component(name: &str) -> String {
    path_arg(&components().join(format!("{name}.wasm")))
}

fn path_arg(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}

fn run(args: &[&str]) -> Output {
    plugin_command(args).output().expect("run breakwater")
}

/// A `breakwater` command whose builds use the plugins workspace's own
/// target directory, where the tests look for components: a target
/// directory set for the host workspace would start a fresh build elsewhere.
fn plugin_command(args: &[&str]) -> std::process::Command {
    let mut command = breakwater(args);
    command.env_remove("CARGO_TARGET_DIR");
    command
}

fn all(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `plugin test` of `component` on a request file written from `cases`;
/// the file's directory lives as long as the returned guard.
fn test_with(
    component_name: &str,
    cases: &str,
    extra: &[&str],
) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("requests.json");
    std::fs::write(&file, cases).expect("write the request file");
    let plugin = component(component_name);
    let request = path_arg(&file);
    let mut args = vec!["plugin", "test", &plugin, "--request", &request];
    args.extend_from_slice(extra);
    (run(&args), file, dir)
}

#[test]
fn bundled_examples_pass() {
    for (dir, name, grants) in EXAMPLES {
        let tests = workspace_root().join("plugins").join(dir).join("tests");
        let request = path_arg(&tests.join("requests.json"));
        let config = path_arg(&tests.join("config.toml"));
        let plugin = component(name);
        let mut args = vec![
            "plugin",
            "test",
            plugin.as_str(),
            "--request",
            &request,
            "--config",
            &config,
        ];
        args.extend_from_slice(grants);
        let output = run(&args);
        assert_eq!(output.status.code(), Some(0), "{dir}: {}", all(&output));

        // One decision per case, in order, each a JSON object.
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&request).expect("read"))
                .expect("the example is JSON");
        let count = cases.as_array().map_or(1, Vec::len);
        assert!(count >= 2, "{dir}: only {count} case(s)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), count, "{dir}: {}", all(&output));
        for (i, line) in lines.iter().enumerate() {
            let decision: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{dir}: line {} is not JSON ({e}): {line}", i + 1));
            assert_eq!(decision["case"], i + 1, "{dir}: {line}");
            assert!(decision["on_request"]["decision"].is_string(), "{line}");
        }
    }
}

#[test]
fn a_wrong_expectation_exits_1_and_says_which() {
    let cases = r#"[
        {"name": "browser", "headers": {"user-agent": "Mozilla/5.0"}, "expect": {"decision": "continue"}},
        {"name": "scanner", "headers": {"user-agent": "nikto"}, "expect": {"decision": "continue"}}
    ]"#;
    let (output, file, _dir) = test_with("waf", cases, &[]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "FAIL {}: case 2 (scanner): on-request: decision: expected continue, got respond",
        file.display()
    );
    assert!(
        stderr.contains(&expected),
        "`{expected}` not printed:\n{text}"
    );
    assert!(stderr.contains("1 passed, 1 failed"), "{text}");
    assert!(!stderr.contains("case 1 (browser):"), "{text}");
    // The decisions are printed all the same, the failing one included.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 2, "{text}");
    assert!(stdout.contains(r#""status":403"#), "{text}");
}

#[test]
fn response_expectations_for_a_plugin_without_a_response_phase_fail_the_case() {
    // The WAF only looks at requests: an `on_response` expectation could only
    // pass by the runner inventing a decision the plugin never made.
    let cases = r#"[
        {"name": "browser", "headers": {"user-agent": "Mozilla/5.0"},
         "response": {"status": 200},
         "expect": {"decision": "continue", "on_response": {"decision": "continue"}}}
    ]"#;
    let (output, file, _dir) = test_with("waf", cases, &[]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let expected = format!(
        "FAIL {}: case 1 (browser): on-response: expectations given, but the plugin has no response phase",
        file.display()
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&expected),
        "`{expected}` not printed:\n{text}"
    );
}

#[test]
fn malformed_json_exits_2_with_file_line_and_column() {
    // The comma after "/" is missing: serde_json stops at line 3, column 5.
    let cases = "[\n  {\"path\": \"/\"\n    \"method\": \"GET\"}\n]\n";
    let (output, file, _dir) = test_with("waf", cases, &[]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    let expected = format!("{}:3:5: error: expected `,` or `}}`", file.display());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&expected),
        "`{expected}` not printed:\n{text}"
    );
    assert!(output.stdout.is_empty(), "{text}");
}

#[test]
fn a_misspelt_expectation_is_bad_input_not_a_pass() {
    let cases = "{\"path\": \"/\",\n \"expect\": {\"stauts\": 403}}";
    let (output, file, _dir) = test_with("waf", cases, &[]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", file.display())) && stderr.contains("`stauts`"),
        "{text}"
    );
}

#[test]
fn an_ungranted_capability_exits_2_naming_the_flag() {
    let (output, _, _guard) = test_with("rate_limit", r#"{"path": "/v1/models"}"#, &[]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--grant counters"),
        "{text}"
    );
}

#[test]
fn a_configuration_the_plugin_refuses_exits_2_with_its_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("waf.json");
    std::fs::write(&config, r#"{"blocked_methods": [""]}"#).expect("write");
    let config = path_arg(&config);
    let (output, _, _guard) = test_with("waf", "{}", &["--config", &config]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("`blocked_methods` must not contain an empty string"),
        "{text}"
    );

    let toml = dir.path().join("waf.toml");
    std::fs::write(&toml, "sql_injection = true\nmax_body_bytes = = 1\n").expect("write");
    let toml = path_arg(&toml);
    let (output, _, _guard) = test_with("waf", "{}", &["--config", &toml]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!("{toml}:2:")),
        "{text}"
    );
}

#[test]
fn a_trap_fails_the_case_unless_expected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("trap.json");
    std::fs::write(&config, r#"{"mode": "trap"}"#).expect("write");
    let config = path_arg(&config);

    let (output, _, _guard) = test_with("fixture_misbehave", "{}", &["--config", &config]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("the call failed (trap)"),
        "{text}"
    );

    let expected = r#"{"expect": {"decision": "failed", "failure": "trap"}}"#;
    let (output, _, _guard) = test_with("fixture_misbehave", expected, &["--config", &config]);
    assert_eq!(output.status.code(), Some(0), "{}", all(&output));
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn build_prints_each_components_size_and_pin() {
    // One crate of the plugins workspace: cargo finds it up to date when
    // `cargo xtask test` has built the workspace, so this takes a second.
    let output = run(&["plugin", "build", "--dir", "plugins/template"]);
    let text = all(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one component expected:\n{text}");

    let artifact = workspace_root().join("plugins/target/wasm32-wasip2/release/template.wasm");
    let bytes = std::fs::read(&artifact).expect("the built component");
    // Paths are shown relative to the directory the command ran in.
    let expected = format!(
        "plugins/target/wasm32-wasip2/release/template.wasm  {} bytes  sha256 = \"{}\"",
        bytes.len(),
        sha256_hex(&bytes)
    );
    assert_eq!(lines[0], expected, "{text}");
}

/// What the SDK's README walks an author through: copy the template, edit
/// it, `plugin build`, `plugin test`. The copy is a crate of its own, outside
/// any workspace, built into the plugins workspace's target directory with
/// the same profile and flags, so that cargo reuses the dependencies it
/// built there and the test takes seconds, not a minute.
#[test]
fn a_copy_of_the_template_builds_and_passes_its_own_examples() {
    let root = workspace_root();
    let plugins = root.join("plugins");
    let copy = tempfile::tempdir().expect("tempdir");
    let copy = copy.path();
    std::fs::create_dir_all(copy.join("src")).expect("mkdir src");
    std::fs::create_dir_all(copy.join(".cargo")).expect("mkdir .cargo");
    for (from, to) in [
        ("Cargo.lock", "Cargo.lock"),
        (".cargo/config.toml", ".cargo/config.toml"),
    ] {
        std::fs::copy(plugins.join(from), copy.join(to)).expect("copy");
    }
    // The edit: another default header value, so the test can tell this
    // build from the bundled template.
    let source = std::fs::read_to_string(plugins.join("template/src/lib.rs")).expect("read");
    let edited = source.replace(
        r#"value: "template".to_owned()"#,
        r#"value: "my-copy".to_owned()"#,
    );
    assert_ne!(edited, source, "the template's default value moved");
    std::fs::write(copy.join("src/lib.rs"), edited).expect("write lib.rs");
    let sdk = root.join("sdk/rust");
    std::fs::write(
        copy.join("Cargo.toml"),
        format!(
            r#"[package]
name = "plugin-cli-copy"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
breakwater-sdk = {{ path = "{}" }}
serde = {{ version = "1", features = ["derive"] }}

[workspace]

# As in plugins/Cargo.toml.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
debug = false
strip = "debuginfo"
"#,
            sdk.display()
        ),
    )
    .expect("write Cargo.toml");
    std::fs::write(
        copy.join("requests.json"),
        r#"{"path": "/", "expect": {"set_headers": {"x-breakwater-plugin": "my-copy"}}}"#,
    )
    .expect("write requests.json");

    let dir = path_arg(copy);
    let output = plugin_command(&["plugin", "build", "--dir", &dir])
        .env("CARGO_TARGET_DIR", plugins.join("target"))
        .output()
        .expect("run breakwater");
    let text = all(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().next().expect("one component");
    let (path, _) = line.split_once("  ").expect("path, then size");
    assert!(path.ends_with("plugin_cli_copy.wasm"), "{text}");
    // Shown relative to the directory the command ran in, the workspace root.
    let path = path_arg(&root.join(path));
    let bytes = std::fs::read(&path).expect("the built component");
    assert!(
        line.ends_with(&format!("sha256 = \"{}\"", sha256_hex(&bytes))),
        "{text}"
    );

    let request = path_arg(&copy.join("requests.json"));
    let output = run(&["plugin", "test", &path, "--request", &request]);
    assert_eq!(output.status.code(), Some(0), "{}", all(&output));
}

#[test]
fn build_without_the_wasm_target_says_how_to_add_it() {
    // A toolchain whose sysroot has no wasm32-wasip2 standard library.
    let dir = tempfile::tempdir().expect("tempdir");
    let sysroot = dir.path().join("sysroot");
    std::fs::create_dir_all(sysroot.join("lib/rustlib/x86_64-unknown-linux-gnu")).expect("mkdir");
    let rustc = dir.path().join("rustc");
    std::fs::write(&rustc, format!("#!/bin/sh\necho '{}'\n", sysroot.display()))
        .expect("write the fake rustc");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rustc, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let output = plugin_command(&["plugin", "build", "--dir", "plugins/template"])
        .env("RUSTC", &rustc)
        .output()
        .expect("run breakwater");
    let text = all(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("fix: rustup target add wasm32-wasip2"),
        "{text}"
    );
}
