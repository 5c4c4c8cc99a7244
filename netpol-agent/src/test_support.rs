//! Fixtures shared by the unit tests of several modules.

use crate::model::{
    Snapshot,
    manifests::{LoadReport, apply_str},
};

/// The snapshot of `manifests`, every one of which must be valid: an
/// invalid fixture would otherwise test less than it claims.
pub(crate) fn snapshot(manifests: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    apply_str(&mut snap, manifests, "test", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    snap
}
