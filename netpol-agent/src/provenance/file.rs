//! The state file on disk: written atomically (a temporary file renamed
//! over it), read back, and refused when of another version.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;

use super::{ProvenanceError, STATE_FILE, STATE_VERSION, State};

impl State {
    /// The state file in `dir`.
    #[must_use]
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Writes `dir/state.json` atomically (a temporary file in `dir`,
    /// renamed over it), creating `dir`.
    ///
    /// # Errors
    /// [`ProvenanceError::Io`].
    pub fn write(&self, dir: &Path) -> Result<PathBuf, ProvenanceError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| ProvenanceError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = Self::path(dir);
        let tmp = dir.join(format!(
            ".{STATE_FILE}.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let text = serde_json::to_vec(self).map_err(|e| ProvenanceError::Io {
            op: "serializing",
            path: path.clone(),
            source: e.into(),
        })?;
        if let Err(e) = std::fs::write(&tmp, text).map_err(io("writing", &tmp)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(path)
    }

    /// Reads `dir/state.json`; `None` when there is none.
    ///
    /// # Errors
    /// When it cannot be read, is not a state file or of another version.
    pub fn read(dir: &Path) -> Result<Option<Self>, ProvenanceError> {
        let path = Self::path(dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ProvenanceError::Io {
                    op: "reading",
                    path,
                    source,
                });
            }
        };
        Self::parse(&path, &text).map(Some)
    }

    /// Parses a state document (`path` names it in errors).
    ///
    /// # Errors
    /// When it is not a state document or of another version.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Self, ProvenanceError> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let parse = |source| ProvenanceError::Parse {
            path: path.to_owned(),
            source,
        };
        let v: Versioned = serde_json::from_slice(text).map_err(parse)?;
        if v.version != STATE_VERSION {
            return Err(ProvenanceError::Version {
                path: path.to_owned(),
                found: v.version,
            });
        }
        serde_json::from_slice(text).map_err(parse)
    }
}
