//! Private bpffs mounts, and a datapath enforcing a compile on pods' host
//! veths.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use netpol_agent::{
    Datapath, DatapathConfig,
    compiler::{self, Compiled},
    model::ObjectRef,
};

use crate::netns::unique;

/// A private bpffs in a temporary folder, unmounted and removed on drop.
pub struct TempBpffs {
    pub root: PathBuf,
}

impl TempBpffs {
    pub fn new() -> Self {
        let root = std::env::temp_dir().join(unique("netpol-bpffs-"));
        std::fs::create_dir_all(&root).expect("creating bpffs folder");
        netpol_agent::bpffs::ensure_mounted_anywhere(&root).expect("mounting bpffs");
        Self { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl Default for TempBpffs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Loads a datapath (in the calling thread's netns), writes `compiled`
/// through the map writer with each pod bound to its host veth, and
/// attaches to every one of those veths. Returns the bindings for later
/// writes.
pub fn enforce(
    bpffs: &TempBpffs,
    compiled: &Compiled,
    pods: &[(ObjectRef, &str)],
) -> (Datapath, BTreeMap<ObjectRef, u32>) {
    let mut dp = Datapath::load(&DatapathConfig {
        bpffs: bpffs.path().to_owned(),
        ..DatapathConfig::default()
    })
    .expect("load");
    let ifaces: BTreeMap<ObjectRef, u32> = pods
        .iter()
        .map(|(pod, host_if)| {
            let index = nix::net::if_::if_nametoindex(*host_if)
                .unwrap_or_else(|e| panic!("{host_if}: {e}"));
            (pod.clone(), index)
        })
        .collect();
    let ops: Vec<_> = compiler::diff(&Compiled::default(), compiled)
        .raw()
        .collect();
    dp.writer().apply(&ops, &ifaces).expect("apply");
    for (pod, host_if) in pods {
        dp.attach(host_if)
            .unwrap_or_else(|e| panic!("attach {pod}: {e}"));
    }
    (dp, ifaces)
}
