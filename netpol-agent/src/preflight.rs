//! Start-up checks: everything the node must offer before `netpol-agent run`
//! loads anything, reported together as one error.
//!
//! [`check`] is a pure function of a root folder (`/` on a node, a fake tree
//! in tests) and reads only these files under it:
//!
//! - `proc/sys/kernel/osrelease`: the kernel is at least 5.10 (and so at
//!   least 4.5, which brought the clsact qdiscs the netlink attach path
//!   uses);
//! - `boot/config-<release>`, when present: `CONFIG_NET_SCH_INGRESS` (which
//!   builds clsact) is not switched off; a kernel without the file passes;
//! - `sys/kernel/btf/vmlinux`: the kernel's BTF;
//! - `proc/self/mounts` and `proc/filesystems`: a bpffs is mounted at the
//!   `--bpffs` folder, or the kernel knows bpffs and the agent holds
//!   `CAP_SYS_ADMIN` to mount it itself;
//! - `proc/self/status` (`CapEff`): the capabilities. On kernels with
//!   `CAP_BPF` (5.8 and later): `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_PERFMON`,
//!   plus `CAP_SYS_RESOURCE` before 5.11 (BPF memory counted against
//!   `RLIMIT_MEMLOCK`); on older ones `CAP_SYS_ADMIN`, `CAP_NET_ADMIN` and
//!   `CAP_SYS_RESOURCE`. `CAP_SYS_ADMIN` stands in for `CAP_BPF` and
//!   `CAP_PERFMON` everywhere. An unreadable release is treated as recent
//!   (and reported by the kernel check).
use std::{
    fmt,
    path::{Path, PathBuf},
};

/// Oldest supported kernel.
pub const MIN_KERNEL: (u32, u32) = (5, 10);
/// Kernel that brought the clsact qdisc.
pub const CLSACT_KERNEL: (u32, u32) = (4, 5);
/// Kernel that brought `CAP_BPF` and `CAP_PERFMON`.
pub const CAP_BPF_KERNEL: (u32, u32) = (5, 8);

/// Kernel from which BPF memory is charged to the memory cgroup instead of
/// `RLIMIT_MEMLOCK`, so `CAP_SYS_RESOURCE` is no longer needed.
pub const MEMCG_KERNEL: (u32, u32) = (5, 11);

/// Capability numbers from `include/uapi/linux/capability.h`.
pub mod cap {
    /// `CAP_NET_ADMIN`.
    pub const NET_ADMIN: u32 = 12;
    /// `CAP_SYS_ADMIN`.
    pub const SYS_ADMIN: u32 = 21;
    /// `CAP_SYS_RESOURCE`.
    pub const SYS_RESOURCE: u32 = 24;
    /// `CAP_PERFMON`.
    pub const PERFMON: u32 = 38;
    /// `CAP_BPF`.
    pub const BPF: u32 = 39;

    /// The capability's name as `capabilities(7)` spells it.
    #[must_use]
    pub const fn name(c: u32) -> &'static str {
        match c {
            NET_ADMIN => "CAP_NET_ADMIN",
            SYS_ADMIN => "CAP_SYS_ADMIN",
            SYS_RESOURCE => "CAP_SYS_RESOURCE",
            PERFMON => "CAP_PERFMON",
            BPF => "CAP_BPF",
            _ => "CAP_?",
        }
    }
}

/// One requirement the node does not meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The kernel is older than [`MIN_KERNEL`] (or its release is unreadable).
    Kernel { found: String },
    /// No clsact qdisc: kernel older than 4.5 or built without
    /// `CONFIG_NET_SCH_INGRESS`.
    Clsact { why: String },
    /// No BTF at `/sys/kernel/btf/vmlinux`.
    Btf { path: PathBuf },
    /// No bpffs at the folder, and no way to mount one.
    Bpffs { path: PathBuf, why: String },
    /// Capabilities the process lacks (names).
    Capabilities { missing: Vec<&'static str> },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kernel { found } => write!(
                f,
                "kernel {}.{} or later (found {found})",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            Self::Clsact { why } => write!(f, "the clsact qdisc ({why})"),
            Self::Btf { path } => write!(
                f,
                "kernel BTF at {} (CONFIG_DEBUG_INFO_BTF=y)",
                path.display()
            ),
            Self::Bpffs { path, why } => {
                write!(f, "a bpffs mounted at {} ({why})", path.display())
            }
            Self::Capabilities { missing } => {
                write!(f, "capabilities {}", missing.join(", "))
            }
        }
    }
}

/// Everything missing, as one error.
#[derive(Debug, thiserror::Error)]
#[error("this node lacks what netpol needs: {}", .missing.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct PreflightError {
    /// Each missing requirement, in the order checked.
    pub missing: Vec<Missing>,
}

/// Checks the node seen under `root` (`/` for the real one) for everything
/// netpol needs, with its bpffs at `bpffs` (a path as the process sees it,
/// not joined to `root`). Returns every missing requirement; empty when all
/// are met.
#[must_use]
pub fn check(root: &Path, bpffs: &Path) -> Vec<Missing> {
    let mut out = Vec::new();
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();

    let release = read("proc/sys/kernel/osrelease").map(|s| s.trim().to_owned());
    let version = release.as_deref().and_then(parse_release);
    match version {
        Some(v) if v >= MIN_KERNEL => {}
        _ => out.push(Missing::Kernel {
            found: release.clone().unwrap_or_else(|| "unreadable".into()),
        }),
    }
    if let Some(v) = version
        && v < CLSACT_KERNEL
    {
        out.push(Missing::Clsact {
            why: format!("kernel {}.{} predates 4.5", v.0, v.1),
        });
    } else if let Some(r) = &release
        && let Some(config) = read(&format!("boot/config-{r}"))
        && config
            .lines()
            .any(|l| l.trim() == "# CONFIG_NET_SCH_INGRESS is not set")
    {
        out.push(Missing::Clsact {
            why: format!("boot/config-{r} has CONFIG_NET_SCH_INGRESS off"),
        });
    }

    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !root.join("sys/kernel/btf/vmlinux").is_file() {
        out.push(Missing::Btf {
            path: btf.to_owned(),
        });
    }

    let caps = read("proc/self/status").and_then(|s| cap_eff(&s));
    let has = |c: u32| caps.is_some_and(|m| m & (1 << c) != 0);

    let mounted = read("proc/self/mounts").is_some_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next(), f.next(), f.next());
            fstype == Some("bpf") && point.map(unescape_mount).as_deref() == Some(bpffs)
        })
    });
    if !mounted {
        let known = read("proc/filesystems").is_some_and(|f| {
            f.lines()
                .any(|l| l.split_whitespace().last() == Some("bpf"))
        });
        let why = if !known {
            Some("the kernel has no bpf filesystem".to_owned())
        } else if !has(cap::SYS_ADMIN) {
            Some(
                "not mounted, and mounting it needs CAP_SYS_ADMIN: mount it on the host first \
                 (the DaemonSet's init container does)"
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(why) = why {
            out.push(Missing::Bpffs {
                path: bpffs.to_owned(),
                why,
            });
        }
    }

    let needed: &[u32] = match version {
        Some(v) if v < CAP_BPF_KERNEL => &[cap::SYS_ADMIN, cap::NET_ADMIN, cap::SYS_RESOURCE],
        Some(v) if v < MEMCG_KERNEL => &[cap::BPF, cap::NET_ADMIN, cap::PERFMON, cap::SYS_RESOURCE],
        _ => &[cap::BPF, cap::NET_ADMIN, cap::PERFMON],
    };
    let missing: Vec<&'static str> = needed
        .iter()
        .copied()
        .filter(|&c| {
            let covered = matches!(c, cap::BPF | cap::PERFMON) && has(cap::SYS_ADMIN);
            !has(c) && !covered
        })
        .map(cap::name)
        .collect();
    if !missing.is_empty() {
        out.push(Missing::Capabilities { missing });
    }
    out
}

/// [`check`] of the real node, as one error.
///
/// # Errors
/// [`PreflightError`] listing everything missing.
pub fn require(bpffs: &Path) -> Result<(), PreflightError> {
    let missing = check(Path::new("/"), bpffs);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError { missing })
    }
}

/// `(major, minor)` of a kernel release such as `6.1.0-18-amd64`.
#[must_use]
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

/// The `CapEff` mask of a `/proc/<pid>/status`.
fn cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// A mount point from `/proc/self/mounts`, with its octal escapes (`\040`
/// for a space) undone.
fn unescape_mount(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.10.0"), Some((5, 10)));
        assert_eq!(parse_release("5.4.0+"), Some((5, 4)));
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("x"), None);
    }

    #[test]
    fn escaped_mount_points_unescape() {
        assert_eq!(unescape_mount("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount("/sys/fs/bpf"), PathBuf::from("/sys/fs/bpf"));
    }
}
