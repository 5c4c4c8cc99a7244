//! Map layouts: the layout version recorded beside the pinned maps, and
//! the maps of a layout being replaced kept until the new ones are filled.

use std::path::{Path, PathBuf};

use netpol_common::maps;

use super::super::DatapathError;
use super::write_record;

/// `<pin_dir>/layout` → the layout version of the maps pinned there.
pub const LAYOUT_RECORD: &str = "layout";

/// Where the maps of a layout being replaced wait until the new ones are
/// filled: `<pin_dir>/layout-v<N>`.
pub(crate) fn old_layout_dir(pin_dir: &Path, version: u32) -> PathBuf {
    pin_dir.join(format!("layout-v{version}"))
}

/// Reads the layout of the maps pinned in `pin_dir`. Maps of another
/// layout are moved to [`old_layout_dir`] (the programs attached keep
/// them, and keep enforcing), so that the load creates fresh ones; returns
/// that layout. Pins from before layouts were recorded are layout 1.
pub(crate) fn prepare_layout(pin_dir: &Path) -> Result<Option<u32>, DatapathError> {
    let current = netpol_common::LAYOUT_VERSION;
    let record = pin_dir.join(LAYOUT_RECORD);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::PinDir { path, source }
    };
    let has_maps = maps::ALL.iter().any(|m| pin_dir.join(m).exists());
    let recorded = std::fs::read_link(&record)
        .ok()
        .and_then(|t| t.to_string_lossy().parse::<u32>().ok())
        .or(has_maps.then_some(1));
    match recorded {
        None => {
            write_record(&record, &current.to_string()).map_err(io_err(&record))?;
            Ok(None)
        }
        Some(v) if v == current => {
            write_record(&record, &current.to_string()).map_err(io_err(&record))?;
            Ok(None)
        }
        Some(v) => {
            let old = old_layout_dir(pin_dir, v);
            if old.exists() {
                // A replacement was interrupted: the maps at the top are
                // new ones, maybe partly filled; start them over.
                for m in maps::ALL {
                    let _ = std::fs::remove_file(pin_dir.join(m));
                }
            } else {
                std::fs::create_dir_all(&old).map_err(io_err(&old))?;
                for m in maps::ALL {
                    let from = pin_dir.join(m);
                    if from.exists() {
                        std::fs::rename(&from, old.join(m)).map_err(io_err(&from))?;
                    }
                }
            }
            tracing::info!(
                found = v,
                current,
                "pinned maps of another layout: replacing them; the programs attached keep the old ones until the new ones are filled"
            );
            Ok(Some(v))
        }
    }
}

/// Records that the maps in `pin_dir` are of the current layout and
/// removes those of layout `old`.
pub(crate) fn finish_layout(pin_dir: &Path, old: u32) -> Result<(), DatapathError> {
    let record = pin_dir.join(LAYOUT_RECORD);
    write_record(&record, &netpol_common::LAYOUT_VERSION.to_string()).map_err(|source| {
        DatapathError::PinDir {
            path: record.clone(),
            source,
        }
    })?;
    let dir = old_layout_dir(pin_dir, old);
    std::fs::remove_dir_all(&dir).map_err(|source| DatapathError::Unpin { path: dir, source })
}
