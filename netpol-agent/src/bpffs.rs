//! The BPF filesystem the agent pins its maps in.
//!
//! bpffs is not mounted on every host (nor inside `ip netns exec`, which
//! remounts /sys), so the agent mounts it when the folder it was given is not
//! on one, the way Cilium's init container does.
use std::{
    io,
    path::{Path, PathBuf},
};

/// Errors preparing the bpffs folder.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("inspecting {path}: {source}")]
    Statfs { path: PathBuf, source: nix::Error },
    #[error("mounting bpffs at {path} (needs CAP_SYS_ADMIN): {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error(
        "{path} is not a bpffs, and one mounted there would be visible only in this agent's own \
         mount namespace ({why}): its pins would die with the agent and the next one would \
         attach a second set of programs. Mount bpffs on the host (mount -t bpf bpffs {path}) \
         and give it to the agent (hostPath with mountPropagation: HostToContainer)"
    )]
    Private { path: PathBuf, why: String },
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
    // nix's constant has the libc target's own width (i64 with glibc, u64
    // with musl).
    Ok(st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Makes sure `root` exists and is a bpffs, mounting one there when it is
/// not, but only where others see it: in the host's mount namespace, or
/// on a mount that propagates to its peers. Returns whether this call
/// mounted it.
///
/// # Errors
/// When the folder cannot be created, bpffs cannot be mounted, or a bpffs
/// mounted there would be private to this mount namespace
/// ([`BpffsError::Private`]).
pub fn ensure_mounted(root: &Path) -> Result<bool, BpffsError> {
    ensure(root, true)
}

/// [`ensure_mounted`] whoever sees the mount: a test's own bpffs.
///
/// # Errors
/// When the folder cannot be created or bpffs cannot be mounted.
pub fn ensure_mounted_anywhere(root: &Path) -> Result<bool, BpffsError> {
    ensure(root, false)
}

fn ensure(root: &Path, shared_only: bool) -> Result<bool, BpffsError> {
    std::fs::create_dir_all(root).map_err(|source| BpffsError::CreateDir {
        path: root.to_owned(),
        source,
    })?;
    if is_bpffs(root)? {
        return Ok(false);
    }
    if shared_only && let Some(why) = private_here(root) {
        return Err(BpffsError::Private {
            path: root.to_owned(),
            why,
        });
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

/// Why a mount at `root` would be seen by this mount namespace only, or
/// `None` when others see it: this is the host's mount namespace (the
/// initial PID namespace, where `kthreadd` is pid 2, and pid 1's mount
/// namespace), or the mount `root` lies on is shared (propagates to its
/// peers, as a hostPath with `Bidirectional` does).
fn private_here(root: &Path) -> Option<String> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let initial_pids =
        std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    if initial_pids && ns("self").is_some() && ns("self") == ns("1") {
        return None;
    }
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // The last mount of the longest mount point containing `root` is the
    // one a new mount would sit on.
    let mut best: Option<(usize, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(dash)) = (fields.get(4), fields.iter().position(|f| *f == "-"))
        else {
            continue;
        };
        let point = Path::new(point);
        if !root.starts_with(point) {
            continue;
        }
        let depth = point.components().count();
        let shared = fields[6..dash].iter().any(|f| f.starts_with("shared:"));
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, shared));
        }
    }
    match best {
        Some((_, true)) => None,
        _ => Some(
            "not the host's mount namespace, and the mount it would sit on is not shared".into(),
        ),
    }
}

/// One agent per set of pins: an exclusive `flock` on the pin folder,
/// held for the agent's life and released by the kernel when it exits,
/// however it exits. bpffs holds no regular files, so the folder itself
/// is the lock; every mount of the same bpffs (the host's, a container's)
/// shares it.
#[derive(Debug)]
pub struct PinLock {
    _dir: std::fs::File,
}

/// How often a waiting agent tries the lock again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Why the pins could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The folder could not be created or opened, or `flock` failed.
    #[error("locking {path}: {source}")]
    Io {
        /// The pin folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another agent kept it past the handover wait.
    #[error(
        "another netpol agent holds {path} ({holder}) and did not exit within {} s: refusing to \
         run a second agent on the same pins",
        waited.as_secs()
    )]
    Held {
        /// The pin folder.
        path: PathBuf,
        /// Who holds it, from /proc/locks.
        holder: String,
        /// How long this agent waited.
        waited: std::time::Duration,
    },
}

/// Takes the lock of `pin_dir` (created if missing), waiting up to `wait`
/// for a holder to exit: the handover of a rolling update, where the
/// next agent starts while the last one still stops.
///
/// # Errors
/// [`LockError::Held`] naming the holder when it is still there after
/// `wait`; [`LockError::Io`] when the folder cannot be locked at all.
pub fn lock(pin_dir: &Path, wait: std::time::Duration) -> Result<PinLock, LockError> {
    use std::os::fd::AsRawFd as _;
    let io_err = |source| LockError::Io {
        path: pin_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(pin_dir).map_err(io_err)?;
    let dir = std::fs::File::open(pin_dir).map_err(io_err)?;
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is
        // passed.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(PinLock { _dir: dir });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(io_err(e));
        }
        let holder = holder(&dir);
        if started.elapsed() >= wait {
            return Err(LockError::Held {
                path: pin_dir.to_owned(),
                holder,
                waited: started.elapsed(),
            });
        }
        if !told {
            tracing::info!(
                pins = %pin_dir.display(),
                %holder,
                wait_secs = wait.as_secs(),
                "another agent holds the pins: waiting for it to exit (handover)"
            );
            told = true;
        }
        std::thread::sleep(LOCK_POLL);
    }
}

/// Who holds the `flock` on `dir`: `pid N (command line)` from
/// /proc/locks, as this process's PID namespace sees it.
fn holder(dir: &std::fs::File) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = dir.metadata() else {
        return "holder unknown".to_owned();
    };
    let dev = meta.dev();
    // /proc/locks: `1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF`,
    // the device as major:minor in hex.
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4).map(|p| (*p).to_owned()))
            .flatten()
    });
    match pid {
        Some(pid) => {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .split('\0')
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if cmd.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid}: {cmd}")
            }
        }
        None => "holder not in /proc/locks (another PID namespace?)".to_owned(),
    }
}
