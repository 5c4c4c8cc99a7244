//! `to_host`: the cgroup-skb program on the root cgroup v2 that judges a
//! pod's Service packet whose backend is one of the node's own addresses
//! (no TC hook sees a forwarded packet delivered locally).
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink};
use netpol_common::programs;

use super::{Datapath, DatapathError, lifecycle};

/// Pin name (under the links folder) of the `to_host` link; not an
/// interface's, so the interface sweeps leave it alone, and `cleanup`
/// detaches it with the others.
pub const HOST_LINK: &str = "cgroup-to_host";

/// Where a cgroup v2 hierarchy is mounted when none is found.
pub const FALLBACK_MOUNT: &str = "/run/netpol/cgroupv2";

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The root of the cgroup v2 hierarchy: `root` itself, its `unified`
/// folder (hybrid hosts), or a cgroup2 mount netpol makes at
/// [`FALLBACK_MOUNT`].
///
/// # Errors
/// [`DatapathError::Cgroup`] when none is found and mounting fails.
pub fn cgroup2_root(root: &Path) -> Result<PathBuf, DatapathError> {
    for candidate in [root.to_path_buf(), root.join("unified")] {
        if is_cgroup2(&candidate) {
            return Ok(candidate);
        }
    }
    let fallback = PathBuf::from(FALLBACK_MOUNT);
    if is_cgroup2(&fallback) {
        return Ok(fallback);
    }
    let mount = || -> std::io::Result<()> {
        std::fs::create_dir_all(&fallback)?;
        nix::mount::mount(
            Some("cgroup2"),
            &fallback,
            Some("cgroup2"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)
    };
    mount().map_err(|source| DatapathError::Cgroup {
        path: root.to_path_buf(),
        source,
    })?;
    Ok(fallback)
}

impl Datapath {
    /// Attaches `to_host` to the root of the cgroup v2 hierarchy found at
    /// or under `root` (see [`cgroup2_root`]) and returns that root. A
    /// persistent datapath pins the link and a later one swaps its program
    /// into it atomically.
    ///
    /// # Errors
    /// No cgroup v2 hierarchy, or the kernel refusing the program or link.
    pub fn attach_host(&mut self, root: &Path) -> Result<PathBuf, DatapathError> {
        let name = programs::TO_HOST;
        let dir = cgroup2_root(root)?;
        let program_err = |source| DatapathError::Program {
            name,
            source: Box::new(source),
        };
        let prog: &mut CgroupSkb = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(program_err)?;
        if prog.fd().is_err() {
            prog.load().map_err(program_err)?;
        }
        let pin = self.pin_dir.join(lifecycle::LINKS_DIR).join(HOST_LINK);
        if self.persistent && pin.exists() {
            let fd = prog.fd().map_err(program_err)?;
            match lifecycle::update_pinned_link(&pin, fd.as_fd()) {
                Ok(()) => {
                    self.hold_host_pin(&pin);
                    self.host = Some(dir.clone());
                    return Ok(dir);
                }
                // A link of another kernel boot or a defunct one: start over.
                Err(e) => {
                    tracing::info!(pin = %pin.display(), error = %e, "replacing the to_host link");
                    let _ = lifecycle::detach_pinned_link(&pin);
                }
            }
        }
        let cgroup = std::fs::File::open(&dir).map_err(|source| DatapathError::Cgroup {
            path: dir.clone(),
            source,
        })?;
        let id = prog
            .attach(
                cgroup,
                CgroupSkbAttachType::Ingress,
                // A link (kernel ≥ 5.7) is always one of many; the kernel
                // refuses the multi flag on link creation.
                CgroupAttachMode::Single,
            )
            .map_err(program_err)?;
        if self.persistent {
            let link = prog.take_link(id).map_err(program_err)?;
            let fd = FdLink::try_from(link).map_err(|source| DatapathError::Link {
                program: name,
                interface: dir.display().to_string(),
                source: Box::new(source),
            })?;
            let pinned = fd.pin(&pin).map_err(|source| DatapathError::PinLink {
                path: pin.clone(),
                source: Box::new(source),
            })?;
            // The pin holds the link; this fd is not needed.
            drop(pinned);
            self.hold_host_pin(&pin);
        }
        self.host = Some(dir.clone());
        tracing::info!(cgroup = %dir.display(), "to_host attached: Service backends on node addresses are judged");
        Ok(dir)
    }

    fn hold_host_pin(&mut self, pin: &Path) {
        if let Err(e) = self.pins.hold(pin) {
            tracing::warn!(pin = %pin.display(), error = %e, "holding the to_host link pin (it cannot be restored if lost)");
        }
    }

    /// The cgroup v2 root `to_host` is attached to, if it is.
    #[must_use]
    pub fn host_cgroup(&self) -> Option<&Path> {
        self.host.as_deref()
    }
}
