//! `breakwater config check`: every broken example is rejected with its
//! location and a fix; the local example passes.

use std::path::{Path, PathBuf};

use breakwater_e2e::{breakwater, workspace_root};

/// Broken examples declare where their error is on their first line: `# expect: 7:11`.
fn expected_location(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).expect("readable example");
    let rest = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{}: no `# expect: LINE:COL` first line", path.display()));
    let (line, column) = rest
        .split_once(':')
        .unwrap_or_else(|| panic!("{}: malformed `# expect:` line", path.display()));
    (
        line.trim().parse().expect("expected line is a number"),
        column.trim().parse().expect("expected column is a number"),
    )
}

fn broken_examples() -> Vec<PathBuf> {
    let dir = workspace_root().join("edge-config/examples/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn broken_examples_exit_2_with_location_and_fix() {
    let files = broken_examples();
    assert!(files.len() >= 5, "only {} broken examples", files.len());
    for file in files {
        let (line, column) = expected_location(&file);
        let arg = file.to_str().expect("UTF-8 path");
        let output = breakwater(&["config", "check", arg])
            .output()
            .expect("run breakwater config check");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let all = format!("{stdout}{stderr}");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{}: exit status {}\n{all}",
            file.display(),
            output.status
        );
        let location = format!("{arg}:{line}:{column}: error:");
        assert!(
            all.contains(&location),
            "{}: `{location}` not printed:\n{all}",
            file.display()
        );
        assert!(
            all.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("fix:")
                    .is_some_and(|fix| !fix.trim().is_empty())
            }),
            "{}: no `fix:` line:\n{all}",
            file.display()
        );
    }
}

#[test]
fn local_example_passes() {
    let file = workspace_root().join("edge-config/examples/local.toml");
    let output = breakwater(&["config", "check", file.to_str().expect("UTF-8 path")])
        .output()
        .expect("run breakwater config check");
    assert_eq!(
        output.status.code(),
        Some(0),
        "exit status {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
