//! Every metric that `deploy/` depends on exists in the real binaries'
//! `/metrics`: the alert rules (`deploy/prometheus/rules.yaml`), the
//! Grafana dashboards (`deploy/grafana/*.json`), prometheus-adapter's rules
//! and the HPAs (`deploy/k8s/…`). A renamed or never-emitted metric would
//! otherwise leave an alert silent or an autoscaler blind.
//!
//! A GPU host serves a tiny model from a `file://` model store (so the
//! swap metrics exist), and an edge in front of it runs what makes the
//! lazily created families appear: a TLS listener (reloaded), plugins with
//! counters against a Redis that is not there (cluster fallbacks), a
//! plugin that spins past its CPU deadline with one plugin slot (failures,
//! sheds), a cached completions route (hits, tokens saved), a pool with a
//! dead endpoint that fails over (health, ejections, failover events), and
//! one whose dead endpoint is tried first (upstream errors, retries).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use breakwater_e2e::{
    EdgeProcess, GpuHostProcess, PATIENCE, breakwater, free_port, gen_test_model, metric,
    plugin_artifact, post_json, wait_for, workspace_root,
};

/// Where `deploy/` writes PromQL, and under which YAML keys.
const YAML_QUERIES: &[(&str, &[&str])] = &[
    ("deploy/prometheus/rules.yaml", &["expr"]),
    (
        "deploy/k8s/monitoring/adapter-config.yaml",
        &["seriesQuery", "metricsQuery"],
    ),
];
const GRAFANA: &str = "deploy/grafana";
const HPAS: &[&str] = &[
    "deploy/k8s/base/edge/hpa.yaml",
    "deploy/k8s/base/gpu-host/hpa.yaml",
];
const ADAPTER: &str = "deploy/k8s/monitoring/adapter-config.yaml";

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_deploy_uses_is_exported() {
    let used = metrics_used_by_deploy();
    assert!(
        used.len() > 20,
        "found only {} metric names in deploy/: {used:?}",
        used.len()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let host = gpu_host_from_store(dir.path()).await;
    let edge = edge_exercising_every_family(dir.path(), &host);
    drive_traffic(&edge).await;

    let mut scraped = Exported::default();
    scraped.add(&edge.metrics().await);
    scraped.add(&host.metrics().await);
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !scraped.has(name))
        .map(|(name, files)| {
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            format!("  {name}  (used in {})", files.join(", "))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} metric(s) used in deploy/ are not exported by the edge or the GPU host:\n{}\n\
         (add them to the binaries, or stop using them in deploy/)",
        missing.len(),
        missing.join("\n")
    );
}

/// A GPU host on `--model-ref m:stable` from a `file://` store holding a
/// tiny model.
async fn gpu_host_from_store(dir: &Path) -> GpuHostProcess {
    let model = dir.join("model");
    gen_test_model(&model, "tiny", 7);
    let store = format!("file://{}", dir.join("store").display());
    let output = breakwater(&[
        "model",
        "push",
        model.to_str().expect("UTF-8 path"),
        "--name",
        "m",
        "--version",
        "1",
        "--channel",
        "stable",
        "--store",
        &store,
    ])
    .output()
    .expect("run breakwater model push");
    assert!(
        output.status.success(),
        "model push failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cache = dir.join("model-cache");
    GpuHostProcess::start(
        &[
            "--model-ref",
            "m:stable",
            "--store",
            &store,
            "--model-cache",
            cache.to_str().expect("UTF-8 path"),
        ],
        |command| {
            command.env_remove("BREAKWATER_ADMIN_TOKEN");
        },
        Duration::from_secs(60),
    )
    .await
}

const ADMIN_TOKEN: &str = "deploy-metrics";

fn edge_exercising_every_family(dir: &Path, host: &GpuHostProcess) -> EdgeProcess {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let plugin = |name: &str, component: &str, extra: &str| {
        let (path, sha256) = plugin_artifact(component);
        format!(
            "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nsha256 = \"{sha256}\"\n{extra}\n\n",
            path.display()
        )
    };
    let plugins = [
        plugin(
            "rate-limit",
            "rate_limit",
            "grants = [\"counters\"]\non_failure = \"open\"\n\
             config = { anonymous = { rate_per_second = 1000, burst = 1000 }, path_prefixes = [\"/v1/\"] }",
        ),
        plugin(
            "cache-policy",
            "cache_policy",
            "config = { default_ttl = 3600 }",
        ),
        // Spins until its CPU deadline stops it, holding the node's only
        // plugin slot meanwhile: a failure each call, and concurrent calls
        // shed.
        plugin(
            "spin",
            "fixture_misbehave",
            "cpu_deadline = \"100ms\"\non_failure = \"open\"\nconfig = { mode = \"spin\" }",
        ),
    ]
    .concat();
    let gpu = host.url("");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let tls_listen = format!("127.0.0.1:{}", free_port());
    let redis_nowhere = format!("redis://127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[[listener]]
address = "{{listen}}"

[[listener]]
address = "{tls_listen}"
tls = {{ cert = "{cert}", key = "{key}" }}

[admin]
address = "{{admin}}"
token = "{ADMIN_TOKEN}"

[limits]
plugin_concurrency = 1
plugin_queue_timeout = "10ms"

[cache]
memory_bytes = 33554432

[cluster]
redis_url = "{redis_nowhere}"
health_interval = "100ms"
on_unavailable = "local"

[[route]]
prefix = "/v1/"
pool = "gpu"
plugins = ["rate-limit", "cache-policy"]
plugin_body_bytes = true
cache = true
count_tokens = true

# Its own pool, whose heavy dead endpoint is tried first: a refused
# connection (upstream error), then the live one (a retry).
[[route]]
prefix = "/v1/models"
pool = "flaky"

[[route]]
prefix = "/spin/"
pool = "gpu"
plugins = ["spin"]

{plugins}
[[pool]]
name = "gpu"
endpoints = ["{gpu}", "{dead}"]
failover = ["peer"]
failover_below = 0.75
health = {{ path = "/health/ready", interval = "100ms", timeout = "50ms", healthy_threshold = 1, unhealthy_threshold = 1 }}
concurrency = {{ initial = 16 }}

[[pool]]
name = "peer"
endpoints = ["{gpu}"]

[[pool]]
name = "flaky"
endpoints = [{{ address = "{dead}", weight = 100 }}, "{gpu}"]
panic_threshold = 0
"#,
        cert = cert.display(),
        key = key.display(),
    );
    EdgeProcess::start(&config)
}

async fn drive_traffic(edge: &EdgeProcess) {
    let client = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("client");
    // The dead endpoint leaves the pool below failover_below: it spills.
    wait_for(
        "the edge marks the dead endpoint down",
        PATIENCE,
        async || {
            let text = edge.metrics().await;
            metric(
                &text,
                "breakwater_upstream_healthy_share",
                &[("pool", "gpu")],
            ) < 0.75
        },
    )
    .await;
    // The same greedy completion twice: a generation, then a cache hit
    // (tokens saved), through the rate limit's counters (Redis fallback).
    let completion = r#"{"model":"m","prompt":"hello","max_tokens":4,"temperature":0}"#;
    for _ in 0..2 {
        let answer = post_json(&client, &edge.url("/v1/completions"), completion).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let models = client
        .get(edge.url("/v1/models"))
        .send()
        .await
        .expect("GET /v1/models");
    assert_eq!(models.status(), 200);
    // Spinning plugin calls at once on one slot: failures, and sheds.
    let spins = (0..4).map(|_| client.get(edge.url("/spin/")).send());
    let statuses: Vec<u16> = futures_util::future::join_all(spins)
        .await
        .into_iter()
        .map(|r| r.map_or(0, |r| r.status().as_u16()))
        .collect();
    assert!(
        statuses.contains(&503),
        "no spin call was shed: {statuses:?}"
    );
    for reload in ["/admin/plugins/reload", "/admin/tls/reload"] {
        let answer = client
            .post(format!("http://{}{reload}", edge.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {reload}: {e}"));
        assert_eq!(answer.status(), 200, "POST {reload}");
    }
}

/// Metric names in the scrapes: sample names, and the families the `#
/// TYPE` lines declare (a histogram's base name stands for its
/// `_bucket`, `_sum` and `_count`).
#[derive(Default)]
struct Exported {
    samples: BTreeSet<String>,
    families: BTreeMap<String, String>,
}

impl Exported {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix("# TYPE ") {
                let mut words = declared.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    self.families.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).unwrap_or(line.len());
                self.samples.insert(line[..end].to_owned());
            }
        }
    }

    fn has(&self, name: &str) -> bool {
        if self.samples.contains(name) || self.families.contains_key(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|base| {
                self.families
                    .get(base)
                    .is_some_and(|kind| kind == "histogram" || kind == "summary")
            })
        })
    }
}

/// Every metric name `deploy/` queries, with the files that use it.
fn metrics_used_by_deploy() -> BTreeMap<String, BTreeSet<String>> {
    let root = workspace_root();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut note = |names: Vec<String>, file: &str| {
        for name in names {
            used.entry(name).or_default().insert(file.to_owned());
        }
    };
    for (file, keys) in YAML_QUERIES {
        let text = read(&root.join(file));
        for query in yaml_values(&text, keys) {
            note(promql_metric_names(&query), file);
        }
    }
    let mut dashboards: Vec<_> = std::fs::read_dir(root.join(GRAFANA))
        .expect("deploy/grafana")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    dashboards.sort();
    for path in dashboards {
        let file = format!("{GRAFANA}/{}", path.file_name().unwrap().to_string_lossy());
        let dashboard: serde_json::Value =
            serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for query in dashboard_queries(&dashboard) {
            note(promql_metric_names(&query), &file);
        }
    }
    // An HPA names what prometheus-adapter serves; a name the adapter
    // derives (`as:`) from other series is covered by its queries above.
    let adapter = read(&root.join(ADAPTER));
    let derived: BTreeSet<String> = yaml_values(&adapter, &["as"]).into_iter().collect();
    for file in HPAS {
        let text = read(&root.join(file));
        let names = yaml_values(&text, &["name"])
            .into_iter()
            .filter(|n| n.starts_with("breakwater_") && !derived.contains(n))
            .collect();
        note(names, file);
    }
    // The reading above is tolerant, not a PromQL parser: it must not
    // have missed a name of ours that the files spell out.
    let mut files: Vec<String> = YAML_QUERIES.iter().map(|(f, _)| f.to_string()).collect();
    files.extend(HPAS.iter().map(|f| f.to_string()));
    files.extend(
        used.values()
            .flatten()
            .filter(|f| f.ends_with(".json"))
            .cloned(),
    );
    for file in files {
        let text = read(&root.join(&file));
        let spelled = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("breakwater_") && !derived.contains(*w));
        for word in spelled {
            assert!(
                used.contains_key(word),
                "{file} names {word}, which the query reader did not find"
            );
        }
    }
    used
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `keys` in a YAML text, read line by line: a plain or
/// quoted scalar on the key's line, or a block (`|`, `>`) of the lines
/// indented below it. Enough for the files in `deploy/`, which a test of
/// names need not parse further.
fn yaml_values(text: &str, keys: &[&str]) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut values = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let item = line.trim_start().trim_start_matches("- ");
        // Where the key starts: a block belongs to it while lines are
        // indented further (a list item's key sits after its `- `).
        let indent = line.len() - item.len();
        i += 1;
        let Some((key, rest)) = item.split_once(':') else {
            continue;
        };
        if !keys.contains(&key.trim()) {
            continue;
        }
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut block = String::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                i += 1;
            }
            values.push(block);
        } else {
            let unquoted = rest
                .strip_prefix('\'')
                .and_then(|r| r.strip_suffix('\''))
                .or_else(|| rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
                .unwrap_or(rest);
            values.push(unquoted.to_owned());
        }
    }
    values
}

/// A dashboard's queries: every panel's targets (rows' panels included),
/// and the metric of each `label_values(METRIC, label)` variable.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(expr.to_owned());
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_default();
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            // The series selector before the last comma; the label after it.
            if let Some((selector, _label)) = args.rsplit_once(',') {
                queries.push(selector.to_owned());
            }
        }
    }
    queries
}

/// Words of PromQL that are not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric names a PromQL expression selects, read tolerantly: an
/// identifier is a metric unless it calls (`name(`), is a keyword or an
/// aggregation, or stands in a label matcher (`{…}`), a range (`[…]`), a
/// label list (`by (…)`), a string, a Grafana variable (`$x`, `${x}`) or a
/// prometheus-adapter template (`<<.Series>>`).
fn promql_metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to = |i: usize, close: char| -> usize {
        let mut j = i + 1;
        let mut quote = None;
        while j < chars.len() {
            let c = chars[j];
            match quote {
                Some(_) if c == '\\' => j += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == close => return j + 1,
                None => {}
            }
            j += 1;
        }
        chars.len()
    };
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                // A string: find its closing quote by skipping to it as a
                // "close" of a one-character group.
                let mut j = i + 1;
                while j < chars.len() && chars[j] != c {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
                i = j + 1;
            }
            '{' => i = skip_to(i, '}'),
            '[' => i = skip_to(i, ']'),
            '<' if chars.get(i + 1) == Some(&'<') => {
                let rest: String = chars[i..].iter().collect();
                i += rest.find(">>").map_or(rest.len(), |end| end + 2);
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_to(i, '}');
                } else {
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let calls = chars.get(next) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    if calls {
                        i = skip_to(next, ')');
                    }
                } else if lower == "offset" {
                    while next < chars.len() && !chars[next].is_whitespace() {
                        next += 1;
                    }
                    i = next;
                } else if !calls && !KEYWORDS.contains(&lower.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_names_are_read_from_expressions() {
    let names = |expr: &str| promql_metric_names(expr);
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (pod, le) (rate(a_bucket{ns=~"x|y", le!="+Inf"}[5m]))) > 2"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("max by (pool) (b - on (pod, pool) c) > 0 and d offset 1d unless e"),
        ["b", "c", "d", "e"]
    );
    assert_eq!(names("min by (l) (f) - time() < 14 * 86400"), ["f"]);
    assert_eq!(
        names(r#"sum(rate(g{namespace=~"$namespace"}[$__rate_interval])) / sum(h)"#),
        ["g", "h"]
    );
    assert_eq!(
        names("sum by (<<.GroupBy>>) (i{<<.LabelMatchers>>}) / <<.Series>>"),
        ["i"]
    );
}

#[test]
fn yaml_values_read_scalars_and_blocks() {
    let text = "a:\n  - expr: 'x{y=\"1\"}'\n    other: 1\n  - expr: |\n      sum(z)\n        / w\n    for: 5m\n";
    assert_eq!(
        yaml_values(text, &["expr"]),
        ["x{y=\"1\"}", "sum(z)\n/ w\n"]
    );
}
