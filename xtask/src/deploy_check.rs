//! `cargo xtask deploy-check`: the image's build stage runs
//! `cargo xtask build-ebpf` and `cargo build --release -p netpol-agent`;
//! after the same builds here, every path deploy/Containerfile copies out of
//! the build stage must exist.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};

/// Where the Containerfile's build stage keeps the repository.
const BUILD_WORKDIR: &str = "/src";

/// The sources of `COPY --from=<stage> <src> <dest>` lines, mapped from the
/// build stage's working folder onto the workspace `root`.
pub fn copied_paths(containerfile: &str, root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in containerfile.lines() {
        let Some(rest) = line.trim().strip_prefix("COPY --from=") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ensure!(fields.len() == 3, "unexpected COPY line: {line}");
        let rel = Path::new(fields[1])
            .strip_prefix(BUILD_WORKDIR)
            .with_context(|| format!("{} is outside {BUILD_WORKDIR}", fields[1]))?;
        out.push(root.join(rel));
    }
    ensure!(!out.is_empty(), "no COPY --from lines");
    Ok(out)
}

/// Builds the object and the release agent, then checks the copied paths.
pub fn check() -> Result<()> {
    let root = crate::root();
    let file = root.join("deploy/Containerfile");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    ensure!(
        text.contains("cargo xtask build-ebpf")
            && text.contains("cargo build --release --locked -p netpol-agent"),
        "{} no longer builds with `cargo xtask build-ebpf` and `cargo build --release`: update \
         this check",
        file.display()
    );
    let paths = copied_paths(&text, &root)?;
    crate::build_ebpf()?;
    println!("xtask: cargo build --release -p netpol-agent (as the image does)");
    crate::run(crate::cargo("stable").args([
        "build",
        "--release",
        "--locked",
        "-p",
        "netpol-agent",
        "--target-dir",
        "target",
    ]))?;
    for p in &paths {
        ensure!(
            p.is_file(),
            "{} copies {}, which the build did not produce",
            file.display(),
            p.display()
        );
        println!("xtask: deploy check: {} exists", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_map_onto_the_workspace() {
        let text = std::fs::read_to_string(crate::root().join("deploy/Containerfile")).unwrap();
        let paths = copied_paths(&text, Path::new("/w")).unwrap();
        assert_eq!(
            paths,
            [
                PathBuf::from("/w/target/release/netpol-agent"),
                PathBuf::from("/w/target/netpol-ebpf.o"),
            ]
        );
    }
}
