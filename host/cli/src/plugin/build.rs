//! `breakwater plugin build`: cargo for `wasm32-wasip2`, then each
//! component's size and sha256 pin.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde::Deserialize;

use super::TARGET;

/// Builds the plugin workspace or crate in `dir` (default: the checkout's
/// `plugins/`) and prints one line per component: path, size, pin.
pub(crate) fn run(dir: Option<PathBuf>, debug: bool) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    // Absolute, because cargo runs in `dir` and must still find it.
    let dir = match dir {
        Some(dir) => cwd.join(dir),
        None => find_plugins_dir(&cwd)?,
    };
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} has no Cargo.toml; --dir takes a plugin workspace (like plugins/) or a plugin \
             crate (like a copy of plugins/template)",
            dir.display()
        );
    }
    check_target_installed(&dir)?;

    let metadata = metadata(&dir, &manifest)?;
    let packages = selected_packages(&metadata, &manifest)?;
    let mut components = Vec::new();
    for package in &packages {
        for target in package.targets.iter().filter(|t| t.is_cdylib()) {
            components.push(target.name.replace('-', "_") + ".wasm");
        }
    }
    if components.is_empty() {
        bail!(
            "no plugin crate in {}: a plugin is a library with `crate-type = [\"cdylib\"]` \
             (see plugins/template/Cargo.toml)",
            dir.display()
        );
    }

    let profile = if debug { "debug" } else { "release" };
    let mut cargo = cargo();
    cargo
        .arg("build")
        .args((!debug).then_some("--release"))
        .args(["--target", TARGET, "--manifest-path"])
        .arg(&manifest);
    for package in &packages {
        cargo.args(["-p", &package.name]);
    }
    // The directory matters, not only the manifest: cargo reads
    // `.cargo/config.toml` (plugins/ sets the stack size there) from it.
    // Cargo's own output goes to stderr so that stdout is only the report.
    let status = cargo
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build for {TARGET} failed ({status})");
    }

    let out_dir = metadata.target_directory.join(TARGET).join(profile);
    eprintln!(
        "built {} component(s) for {TARGET} ({profile}); pin each in its `[[plugin]]` section:",
        components.len()
    );
    for component in components {
        let path = out_dir.join(&component);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading the built component {}", path.display()))?;
        let shown = path.strip_prefix(&cwd).unwrap_or(&path);
        println!(
            "{}  {} bytes  sha256 = \"{}\"",
            shown.display(),
            bytes.len(),
            breakwater_sandbox::sha256_hex(&bytes)
        );
    }
    Ok(())
}

/// The `plugins/` workspace of the checkout around `start`: the first
/// ancestor (itself included) holding `plugins/Cargo.toml`. Outside a
/// checkout, the crate or workspace around `start`, as cargo would pick it,
/// so that an author's standalone plugin builds without `--dir`.
fn find_plugins_dir(start: &Path) -> anyhow::Result<PathBuf> {
    let plugins = start
        .ancestors()
        .map(|dir| dir.join("plugins"))
        .find(|plugins| plugins.join("Cargo.toml").is_file());
    let nearest = || {
        start
            .ancestors()
            .find(|dir| dir.join("Cargo.toml").is_file())
            .map(Path::to_path_buf)
    };
    plugins.or_else(nearest).with_context(|| {
        format!(
            "no plugins/Cargo.toml nor Cargo.toml in {} or any parent; pass --dir DIR (a plugin \
             workspace or crate)",
            start.display()
        )
    })
}

/// The cargo that runs this command when there is one (`cargo run`, tests),
/// else the one on PATH.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Fails with the fix when the toolchain cargo will use in `dir` lacks the
/// standard library for [`TARGET`]: cargo's own error for that ("can't find
/// crate for `core`") does not say what to do. The toolchain is asked from
/// `dir` because a `rust-toolchain.toml` there may pick another one.
fn check_target_installed(dir: &Path) -> anyhow::Result<()> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    // Without an answer there is nothing to check against: cargo will
    // report the broken toolchain itself.
    let Ok(output) = output else { return Ok(()) };
    if !output.status.success() {
        return Ok(());
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).is_dir() {
        return Ok(());
    }
    bail!(
        "the {TARGET} target is not installed for the Rust toolchain at {}\n\
         fix: rustup target add {TARGET}   (run it in {} if a rust-toolchain file picks the \
         toolchain there)",
        sysroot.display(),
        dir.display()
    )
}

/// What `cargo metadata --no-deps` says about a workspace; only the fields
/// used here.
#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    #[serde(default)]
    workspace_default_members: Option<Vec<String>>,
    target_directory: PathBuf,
}

#[derive(Deserialize)]
struct Package {
    id: String,
    name: String,
    manifest_path: PathBuf,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    #[serde(default)]
    crate_types: Vec<String>,
}

impl Target {
    fn is_cdylib(&self) -> bool {
        self.crate_types.iter().any(|t| t == "cdylib")
    }
}

fn metadata(dir: &Path, manifest: &Path) -> anyhow::Result<Metadata> {
    let output = cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata for {} failed:\n{}",
            manifest.display(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    serde_json::from_slice(&output.stdout).context("reading cargo metadata's output")
}

/// The packages `dir` stands for: the crate whose manifest it is, or, for a
/// workspace root without a package, its default members (all members when
/// it names none), as a plain `cargo build` there would build.
fn selected_packages<'m>(
    metadata: &'m Metadata,
    manifest: &Path,
) -> anyhow::Result<Vec<&'m Package>> {
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("resolving {}", manifest.display()))?;
    let same_manifest = |package: &&Package| {
        package
            .manifest_path
            .canonicalize()
            .is_ok_and(|path| path == manifest)
    };
    if let Some(package) = metadata.packages.iter().find(same_manifest) {
        return Ok(vec![package]);
    }
    let packages = match &metadata.workspace_default_members {
        Some(ids) if !ids.is_empty() => metadata
            .packages
            .iter()
            .filter(|p| ids.contains(&p.id))
            .collect(),
        _ => metadata.packages.iter().collect(),
    };
    Ok(packages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_plugins_from_inside_the_checkout() {
        let root = tempfile::tempdir().expect("tempdir");
        let plugins = root.path().join("plugins");
        std::fs::create_dir_all(plugins.join("waf/src")).expect("mkdir");
        std::fs::write(plugins.join("Cargo.toml"), "[workspace]\n").expect("write");
        let found = find_plugins_dir(&plugins.join("waf/src")).expect("found");
        assert_eq!(found, plugins);
        let found = find_plugins_dir(root.path()).expect("found from the root");
        assert_eq!(found, plugins);
    }

    #[test]
    fn outside_a_checkout_the_crate_around_is_built() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("src")).expect("mkdir");
        std::fs::write(root.path().join("Cargo.toml"), "[package]\n").expect("write");
        let found = find_plugins_dir(&root.path().join("src")).expect("found");
        assert_eq!(found, root.path());
    }

    #[test]
    fn outside_a_checkout_asks_for_dir() {
        let root = tempfile::tempdir().expect("tempdir");
        let error = find_plugins_dir(root.path()).expect_err("nothing there");
        assert!(format!("{error}").contains("--dir"), "{error}");
    }
}
