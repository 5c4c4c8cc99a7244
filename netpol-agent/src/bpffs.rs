//! The BPF filesystem the agent pins its maps in.
//!
//! bpffs is not mounted on every host (nor inside `ip netns exec`, which
//! remounts /sys), so the agent mounts it when the folder it was given is not
//! on one, the way Cilium's init container does.
use std::{
    io,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors preparing the bpffs folder.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("inspecting {path}: {source}")]
    Statfs { path: PathBuf, source: nix::Error },
    #[error("mounting bpffs at {path} (needs CAP_SYS_ADMIN): {source}")]
    Mount { path: PathBuf, source: nix::Error },
}

/// Whether `path` lies on a bpffs.
///
/// # Errors
/// When `path` cannot be inspected.
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let st = nix::sys::statfs::statfs(path).map_err(|source| BpffsError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    // The type's width differs by libc target; the magic fits in any of them.
    #[expect(
        clippy::useless_conversion,
        reason = "f_type is i64 on some targets only"
    )]
    let magic = i64::from(st.filesystem_type().0);
    Ok(magic == BPF_FS_MAGIC)
}

/// Makes sure `root` exists and is a bpffs, mounting one there when it is not.
/// Returns whether this call mounted it.
///
/// # Errors
/// When the folder cannot be created or bpffs cannot be mounted.
pub fn ensure_mounted(root: &Path) -> Result<bool, BpffsError> {
    std::fs::create_dir_all(root).map_err(|source| BpffsError::CreateDir {
        path: root.to_owned(),
        source,
    })?;
    if is_bpffs(root)? {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpffs"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|source| BpffsError::Mount {
        path: root.to_owned(),
        source,
    })?;
    Ok(true)
}
