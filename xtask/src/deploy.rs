//! Checks of `deploy/`: the Kubernetes manifests render and validate, the
//! alert rules load and pass their unit tests, the copies that must agree
//! do, and the edge configuration the manifests ship is one the node
//! accepts. `cargo xtask deploy-check` runs them alone; `cargo xtask test`
//! runs them before the suite. `cargo xtask deploy-sync` rewrites the one
//! generated file, the PrometheusRule.
//!
//! Tools: `kubectl` (its built-in kustomize, v5 or later) and `promtool`
//! from Debian's `prometheus` package, and the PyPI package
//! `kubernetes-validate` (pinned, with its Kubernetes schemas bundled: no
//! network at check time) in `.cache/venv-kubernetes-validate`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{cargo, ensure_debian_package_with, ensure_venv, output_of};

const RULES: &str = "deploy/prometheus/rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/rules.test.yaml";
const PROMETHEUS_RULE: &str = "deploy/k8s/base/monitoring/prometheusrule.yaml";
const RUNBOOK: &str = "deploy/RUNBOOK.md";
const OVERLAYS: &str = "deploy/k8s/overlays";
const COMPONENTS: &str = "deploy/k8s/components";
const MONITORING: &str = "deploy/k8s/monitoring";
const SECRET_EXAMPLES: &str = "deploy/k8s/secrets";
const EDGE_CONFIG: &str = "deploy/k8s/base/edge/edge.toml";
const ADAPTER_CONFIG: &str = "deploy/k8s/monitoring/adapter-config.yaml";
const GRAFANA: &str = "deploy/grafana";
/// Where rendered manifests land, for the validator and for a reader
/// chasing a failure.
const RENDERED: &str = "target/deploy-check";

const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const KUBERNETES_VALIDATE_VENV: &str = ".cache/venv-kubernetes-validate";
/// The Kubernetes release the manifests are validated against: the oldest
/// one they are meant to run on (preStop `sleep` needs 1.30).
const KUBERNETES_VERSION: &str = "1.32.0";

/// Kinds whose schemas kubernetes-validate does not carry (they are CRDs,
/// the Prometheus Operator's); they are skipped, and any other kind
/// without a schema fails the check.
const UNVALIDATED_KINDS: &[(&str, &str)] = &[
    ("ServiceMonitor", "monitoring.coreos.com/v1"),
    ("PodMonitor", "monitoring.coreos.com/v1"),
    ("PrometheusRule", "monitoring.coreos.com/v1"),
];

/// Installs what the checks need, when missing.
pub fn ensure_tools() -> anyhow::Result<()> {
    // The Rust machines' image ships kubectl; elsewhere it comes from an
    // apt source that has it (Debian's own `kubernetes-client` is 1.20,
    // whose kustomize is too old for these overlays).
    ensure_debian_package_with("kubectl", "kubectl", &[])?;
    // promtool only; the package's server is never started (the policy
    // that ensure_debian_package_with puts in place refuses it).
    ensure_debian_package_with("promtool", "prometheus", &["--no-install-recommends"])?;
    ensure_venv(
        Path::new(KUBERNETES_VALIDATE_VENV),
        "kubernetes-validate",
        KUBERNETES_VALIDATE_VERSION,
    )
}

/// One check: a one-line summary when it passes, what to fix when not.
type Check = fn() -> anyhow::Result<String>;

/// Every check, each saying what failed and how to fix it; all run, and
/// the failures are reported together.
pub fn checks() -> anyhow::Result<()> {
    ensure_tools()?;
    let steps: [(&str, Check); 8] = [
        ("PrometheusRule matches rules.yaml", prometheus_rule_in_sync),
        ("every alert links its runbook section", runbooks_linked),
        (
            "every alert tested firing and silent",
            alerts_tested_both_ways,
        ),
        ("promtool check rules / test rules", promtool),
        (
            "HPA metrics served by prometheus-adapter",
            hpa_metrics_served,
        ),
        ("Grafana dashboards", dashboards),
        (
            "kubectl kustomize + kubernetes-validate",
            render_and_validate,
        ),
        ("breakwater config check on the edge's config", edge_config),
    ];
    let mut failed = Vec::new();
    for (name, step) in steps {
        match step() {
            Ok(summary) => eprintln!("deploy-check: ok    {name}: {summary}"),
            Err(e) => {
                eprintln!("deploy-check: FAIL  {name}:\n{e:#}\n");
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("deploy checks failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Rewrites the PrometheusRule from rules.yaml.
pub fn sync() -> anyhow::Result<()> {
    let rules = read(RULES)?;
    std::fs::write(PROMETHEUS_RULE, prometheus_rule(&rules))
        .with_context(|| format!("writing {PROMETHEUS_RULE}"))?;
    eprintln!("xtask: wrote {PROMETHEUS_RULE} from {RULES}");
    Ok(())
}

/// rules.yaml's groups, as the Prometheus Operator's custom resource.
fn prometheus_rule(rules: &str) -> String {
    let mut out = format!(
        "# Generated from {RULES} by `cargo xtask deploy-sync`: edit that file, then\n\
         # run it. `cargo xtask deploy-check` fails while the two differ.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: breakwater\n\
         spec:\n"
    );
    // The file's own header comment speaks of the file; the groups follow.
    let body = rules
        .lines()
        .skip_while(|line| !line.starts_with("groups:"));
    for line in body {
        if line.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn prometheus_rule_in_sync() -> anyhow::Result<String> {
    let want = prometheus_rule(&read(RULES)?);
    let have = std::fs::read_to_string(PROMETHEUS_RULE).unwrap_or_default();
    if have != want {
        bail!("{PROMETHEUS_RULE} differs from {RULES}: run `cargo xtask deploy-sync`");
    }
    Ok("equal".into())
}

/// GitHub's anchor for a Markdown heading: lower case, spaces to dashes,
/// punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn runbooks_linked() -> anyhow::Result<String> {
    let rules = read(RULES)?;
    let runbook = read(RUNBOOK)?;
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| anchor(heading.trim_start_matches('#')))
        .collect();
    let alerts = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let mut links = 0;
    let mut problems = Vec::new();
    for line in rules.lines() {
        let Some(url) = line.trim().strip_prefix("runbook_url:") else {
            continue;
        };
        links += 1;
        let url = url.trim().trim_matches('"');
        match url.split_once('#') {
            Some((file, section)) if file == RUNBOOK && anchors.contains(section) => {}
            _ => problems.push(format!(
                "  {url}: no such section in {RUNBOOK} (want `{RUNBOOK}#<heading anchor>`)"
            )),
        }
    }
    if links != alerts {
        problems.push(format!(
            "  {alerts} alerts but {links} runbook_url annotations: every alert needs one"
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(format!("{alerts} alerts"))
}

/// Each alert of rules.yaml needs a test case in which it fires and one
/// in which it stays silent (`exp_alerts: []`): a rule that can never
/// fire and a rule that always fires both pass a one-sided test.
fn alerts_tested_both_ways() -> anyhow::Result<String> {
    let rules = read(RULES)?;
    let tests = read(RULE_TESTS)?;
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut current: Option<&str> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().trim_matches('"'));
        } else if let Some(expected) = line.strip_prefix("exp_alerts:")
            && let Some(name) = current.take()
        {
            if expected.trim() == "[]" {
                silent.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    let mut problems = Vec::new();
    let mut alerts = 0;
    for name in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().trim_matches('"'))
    {
        alerts += 1;
        if !firing.contains(name) {
            problems.push(format!("  {name}: no case in {RULE_TESTS} where it fires"));
        }
        if !silent.contains(name) {
            problems.push(format!(
                "  {name}: no case in {RULE_TESTS} where it stays silent (`exp_alerts: []`)"
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(format!("{alerts} alerts"))
}

fn promtool() -> anyhow::Result<String> {
    let mut out = String::new();
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let output = Command::new("promtool")
            .args(args)
            .output()
            .context("running promtool")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!("promtool {}:\n{text}", args.join(" "));
        }
        let last = text.lines().rev().find(|l| !l.trim().is_empty());
        let _ = write!(out, "{} {}; ", args[0], last.unwrap_or("").trim());
    }
    Ok(out.trim_end_matches("; ").to_owned())
}

/// The metric names the HPAs ask for (`metric:` then `name:`).
fn hpa_metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "metric:"
            && let Some(name) = lines.next().and_then(|l| l.trim().strip_prefix("name:"))
        {
            names.push(name.trim().trim_matches('"').to_owned());
        }
    }
    names
}

fn hpa_metrics_served() -> anyhow::Result<String> {
    let adapter = read(ADAPTER_CONFIG)?;
    let served: BTreeSet<String> = adapter
        .lines()
        .filter_map(|l| l.trim().strip_prefix("as:"))
        .map(|name| name.trim().trim_matches('"').to_owned())
        .collect();
    let mut asked = Vec::new();
    for hpa in files_named("deploy/k8s/base", "hpa.yaml")? {
        asked.extend(hpa_metric_names(&read_path(&hpa)?));
    }
    let missing: Vec<&String> = asked.iter().filter(|n| !served.contains(*n)).collect();
    if !missing.is_empty() {
        bail!(
            "HPAs ask for metrics {ADAPTER_CONFIG} does not serve (no rule with `as: NAME`): {missing:?}"
        );
    }
    Ok(format!("{} metrics", asked.len()))
}

fn dashboards() -> anyhow::Result<String> {
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    let mut count = 0;
    for path in files_with_extension(GRAFANA, "json")? {
        count += 1;
        let shown = path.display();
        let text = read_path(&path)?;
        let dashboard: serde_json::Value = match serde_json::from_str(&text) {
            Ok(value) => value,
            Err(e) => {
                problems.push(format!("  {shown}: not JSON: {e}"));
                continue;
            }
        };
        let uid = dashboard["uid"].as_str().unwrap_or_default();
        if uid.is_empty() || !uids.insert(uid.to_owned()) {
            problems.push(format!("  {shown}: missing or repeated uid {uid:?}"));
        }
        let variables = dashboard["templating"]["list"].as_array();
        let has_datasource = variables.is_some_and(|list| {
            list.iter()
                .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        });
        if !has_datasource {
            problems.push(format!(
                "  {shown}: no `datasource` template variable of type prometheus"
            ));
        }
        for panel in all_panels(&dashboard) {
            let title = panel["title"].as_str().unwrap_or("?");
            if panel["type"] == "row" {
                continue;
            }
            if panel["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "  {shown}: panel {title:?} does not use the ${{datasource}} variable"
                ));
            }
            let targets = panel["targets"].as_array().map_or(0, Vec::len);
            if targets == 0 {
                problems.push(format!("  {shown}: panel {title:?} has no query"));
            }
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(format!("{count} dashboards"))
}

/// Panels, those inside collapsed rows included.
fn all_panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    panels
}

fn render_and_validate() -> anyhow::Result<String> {
    check_kustomize_version()?;
    let rendered = Path::new(RENDERED);
    std::fs::create_dir_all(rendered).with_context(|| format!("creating {RENDERED}"))?;
    let mut builds: Vec<(String, PathBuf)> = Vec::new();
    let overlays = subdirectories(OVERLAYS)?;
    for overlay in &overlays {
        builds.push((file_name(overlay), overlay.clone()));
    }
    builds.push(("monitoring".into(), PathBuf::from(MONITORING)));
    // A component cannot be built alone: each is built on the first
    // overlay, from a kustomization written here.
    let first = overlays
        .first()
        .with_context(|| format!("no overlay in {OVERLAYS}"))?;
    for component in subdirectories(COMPONENTS)? {
        let name = format!("{}+{}", file_name(first), file_name(&component));
        let dir = rendered.join(&name);
        std::fs::create_dir_all(&dir)?;
        let up = "../../../";
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 resources:\n  - {up}{}\ncomponents:\n  - {up}{}\n",
                first.display(),
                component.display()
            ),
        )?;
        builds.push((name, dir));
    }
    let mut to_validate = Vec::new();
    for (name, dir) in &builds {
        let output = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .context("running kubectl kustomize")?;
        if !output.status.success() {
            bail!(
                "kubectl kustomize {}:\n{}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let file = rendered.join(format!("{name}.yaml"));
        std::fs::write(&file, &output.stdout)?;
        to_validate.push(file);
    }
    to_validate.extend(files_with_extension(SECRET_EXAMPLES, "yaml")?);
    let validator = Path::new(KUBERNETES_VALIDATE_VENV).join("bin/kubernetes-validate");
    let mut problems = Vec::new();
    let mut skipped = BTreeSet::new();
    for file in &to_validate {
        let output = Command::new(&validator)
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .arg(file)
            .output()
            .with_context(|| format!("running {}", validator.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        for line in text.lines() {
            if line.starts_with("WARN ") && line.contains("Couldn't find schema for kind") {
                let allowed = UNVALIDATED_KINDS.iter().find(|(kind, api)| {
                    line.contains(&format!("kind {kind} with api version {api} "))
                });
                match allowed {
                    Some((kind, _)) => {
                        skipped.insert(*kind);
                    }
                    None => problems.push(format!("  {line}")),
                }
            } else if !line.trim().is_empty() {
                problems.push(format!("  {line}"));
            }
        }
        if !output.status.success() && problems.is_empty() {
            problems.push(format!(
                "  {}: kubernetes-validate exited with {}:\n{}",
                file.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "against Kubernetes {KUBERNETES_VERSION} (rendered files in {RENDERED}):\n{}",
            problems.join("\n")
        );
    }
    let names: Vec<&str> = builds.iter().map(|(name, _)| name.as_str()).collect();
    Ok(format!(
        "rendered {} and validated them against Kubernetes {KUBERNETES_VERSION} (no schema, skipped: {})",
        names.join(", "),
        skipped.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

/// `kubectl kustomize` is as old as kubectl: components and `labels` need
/// kustomize v4 or later.
fn check_kustomize_version() -> anyhow::Result<()> {
    let text = output_of(Command::new("kubectl").args(["version", "--client"]))
        .context("`kubectl version --client` failed")?;
    let major = text
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major >= 4 => Ok(()),
        _ => bail!(
            "kubectl's kustomize is too old or unknown ({}); install kubectl 1.21 or later",
            text.trim()
        ),
    }
}

/// The shipped edge configuration, laid out as in the pod: edge.toml with
/// `tls/` beside it. The TLS files come from a Secret there; the check
/// only needs them to exist, so empty stand-ins take their place.
fn edge_config() -> anyhow::Result<String> {
    let dir = Path::new(RENDERED).join("edge-config");
    std::fs::create_dir_all(dir.join("tls"))?;
    std::fs::copy(EDGE_CONFIG, dir.join("edge.toml"))
        .with_context(|| format!("copying {EDGE_CONFIG}"))?;
    for stand_in in ["tls/tls.crt", "tls/tls.key"] {
        std::fs::write(dir.join(stand_in), "")?;
    }
    let output = cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "breakwater-cli",
            "--bin",
            "breakwater",
            "--",
            "config",
            "check",
        ])
        .arg(dir.join("edge.toml"))
        .output()
        .context("running breakwater config check")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{EDGE_CONFIG} (checked as {}):\n{text}", dir.display());
    }
    Ok(text.trim().to_owned())
}

fn read(path: &str) -> anyhow::Result<String> {
    read_path(Path::new(path))
}

fn read_path(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sorted_entries(dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

fn subdirectories(dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect())
}

fn files_with_extension(dir: &str, extension: &str) -> anyhow::Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect())
}

/// Files called `name` anywhere under `dir`.
fn files_named(dir: &str, name: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::from(dir)];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == name) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_githubs() {
        assert_eq!(
            anchor(" BreakwaterGpuUtilisationHigh"),
            "breakwatergpuutilisationhigh"
        );
        assert_eq!(anchor("Pre-scaling, why"), "pre-scaling-why");
    }

    #[test]
    fn the_rule_resource_indents_the_groups_and_drops_the_header() {
        let rules = "# about this file\ngroups:\n  - name: g\n\n    rules: []\n";
        let resource = prometheus_rule(rules);
        assert!(resource.ends_with("spec:\n  groups:\n    - name: g\n\n      rules: []\n"));
        assert!(!resource.contains("about this file"));
    }

    #[test]
    fn hpa_metric_names_are_found() {
        let hpa = "  metrics:\n    - type: Pods\n      pods:\n        metric:\n          name: queue_depth\n";
        assert_eq!(hpa_metric_names(hpa), ["queue_depth"]);
    }
}
