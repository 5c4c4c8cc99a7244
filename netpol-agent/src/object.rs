//! Finding the compiled eBPF object.
//!
//! The object is built separately (`cargo xtask build-ebpf`, nightly, BPF
//! target), so the agent looks for it at a few stable places instead of
//! embedding it; embedders can also hand the bytes over directly.
use std::path::{Path, PathBuf};

/// Environment variable naming the object explicitly.
pub const OBJECT_ENV: &str = "NETPOL_EBPF_OBJECT";
/// File name of the object next to the agent binary or in an install folder.
pub const OBJECT_FILE: &str = "netpol-ebpf.o";
/// Where packages and the container image install the object.
pub const INSTALL_PATH: &str = "/usr/lib/netpol/netpol-ebpf.o";
/// Where `cargo xtask build-ebpf` leaves it in the workspace; none in the
/// image's build (`cargo xtask image` sets `NETPOL_NO_WORKSPACE_OBJECT`),
/// whose binary must name no folder of the machine it was built on: that
/// would make two checkouts of one commit build different images.
pub const WORKSPACE_PATH: Option<&str> = match option_env!("NETPOL_NO_WORKSPACE_OBJECT") {
    Some(_) => None,
    None => Some(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/netpol-ebpf.o"
    )),
};

/// The object could not be found.
#[derive(Debug, thiserror::Error)]
#[error(
    "netpol eBPF object not found (looked at: {}); run `cargo xtask build-ebpf`, or set {OBJECT_ENV}",
    .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
)]
pub struct ObjectNotFound {
    /// Every place looked at, in order.
    pub searched: Vec<PathBuf>,
}

/// The places looked at, in order: `$NETPOL_EBPF_OBJECT`, next to the
/// running binary and one folder up (`target/debug/..`), the install path,
/// then the workspace's `target/` (but for the image's build).
#[must_use]
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(OBJECT_ENV) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(OBJECT_FILE));
        if let Some(up) = dir.parent() {
            out.push(up.join(OBJECT_FILE));
        }
    }
    out.push(PathBuf::from(INSTALL_PATH));
    out.extend(WORKSPACE_PATH.map(PathBuf::from));
    out
}

/// The first existing candidate. An explicit `$NETPOL_EBPF_OBJECT` that does
/// not exist is an error rather than silently falling back to another build.
///
/// # Errors
/// [`ObjectNotFound`] listing every place looked at.
pub fn locate() -> Result<PathBuf, ObjectNotFound> {
    locate_in(
        std::env::var_os(OBJECT_ENV).map(PathBuf::from),
        candidates(),
    )
}

fn locate_in(
    explicit: Option<PathBuf>,
    candidates: Vec<PathBuf>,
) -> Result<PathBuf, ObjectNotFound> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ObjectNotFound { searched: vec![p] })
        };
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(ObjectNotFound {
            searched: candidates,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_object_error_says_how_to_build_it() {
        let err = locate_in(None, vec![PathBuf::from("/nonexistent/netpol-ebpf.o")])
            .expect_err("nothing exists");
        let msg = err.to_string();
        assert!(msg.contains("cargo xtask build-ebpf"), "{msg}");
        assert!(msg.contains("/nonexistent/netpol-ebpf.o"), "{msg}");
    }

    #[test]
    fn explicit_path_that_does_not_exist_is_an_error_not_a_fallback() {
        let existing = std::env::current_exe().expect("test binary");
        let err = locate_in(Some(PathBuf::from("/nonexistent/x.o")), vec![existing])
            .expect_err("explicit path wins");
        assert_eq!(err.searched, vec![PathBuf::from("/nonexistent/x.o")]);
    }

    #[test]
    fn first_existing_candidate_is_chosen() {
        let existing = std::env::current_exe().expect("test binary");
        let found = locate_in(
            None,
            vec![PathBuf::from("/nonexistent/a.o"), existing.clone()],
        )
        .expect("found");
        assert_eq!(found, existing);
    }
}
