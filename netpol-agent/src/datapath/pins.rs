//! The pins a persistent datapath owns, and their restoration from the
//! descriptors it holds.
//!
//! A pinned map or link lives while its pin or a descriptor of it does.
//! Losing the pins (a stray `rm`, `umount -l` of the bpffs) changes
//! nothing while the agent runs, but when it exits the kernel detaches
//! every link only its descriptors held, and the next agent finds no maps:
//! the pods are open until it attaches again. So the datapath keeps one
//! descriptor per pin and puts back what is missing
//! ([`Datapath::restore_pins`](super::Datapath::restore_pins), called by
//! the sync loop every [`CHECK_EVERY`]).
use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

/// How often the sync loop looks for missing pins.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Pin path → a descriptor of what it pins.
#[derive(Debug, Default)]
pub(super) struct Pins {
    held: BTreeMap<PathBuf, OwnedFd>,
}

/// Why a pin could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The bpffs root is no bpffs any more and none could be mounted.
    #[error(
        "{root} is no longer a bpffs (unmounted?) and none could be mounted there ({reason}): \
         the pins cannot be restored; enforcement holds while this agent runs and ends when it \
         exits. Mount bpffs on the host (mount -t bpf bpffs {root})"
    )]
    NoBpffs {
        /// The bpffs root.
        root: PathBuf,
        /// Why mounting failed.
        reason: String,
    },
    /// A pin or its folder could not be created.
    #[error("re-pinning {path}: {source}")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Pins {
    /// Keeps a descriptor of the object pinned at `path`.
    pub(super) fn hold(&mut self, path: &Path) -> std::io::Result<()> {
        let fd = super::lifecycle::bpf_obj_get(path)?;
        self.held.insert(path.to_owned(), fd);
        Ok(())
    }

    /// Forgets `path` (unpinned on purpose).
    pub(super) fn forget(&mut self, path: &Path) {
        self.held.remove(path);
    }

    /// Pins again what is missing; returns what was.
    pub(super) fn restore(&self) -> Result<Vec<PathBuf>, RestoreError> {
        let mut restored = Vec::new();
        for (path, fd) in &self.held {
            match std::fs::symlink_metadata(path) {
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RestoreError::Pin {
                        path: path.clone(),
                        source,
                    });
                }
            }
            let pin_err = |source| RestoreError::Pin {
                path: path.clone(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(pin_err)?;
            }
            super::lifecycle::bpf_obj_pin(fd.as_fd(), path).map_err(pin_err)?;
            restored.push(path.clone());
        }
        Ok(restored)
    }

    /// Whether no pin is held (a datapath that pins nothing).
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
