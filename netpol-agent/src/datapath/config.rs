//! What to load and how: the datapath's configuration, its map sizes, and
//! the check of the mark mask.

use std::path::PathBuf;

use netpol_common::{GlobalConfig, mark};

use super::{DEFAULT_BPFFS, DatapathError, PIN_SUBDIR};

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Kernels ≥ 6.6: TCX links, a pod interface's preceded by netlink
    /// clsact filters until the loop moves it
    /// ([`super::Datapath::attach_staged`]); netlink filters below 6.6.
    #[default]
    Auto,
    /// Netlink clsact filters (the only path before 6.6).
    Netlink,
    /// TCX links (6.6 and later).
    Tcx,
}

/// What to load and where to pin it.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs mount point; mounted when it is not a bpffs yet.
    pub bpffs: PathBuf,
    /// The object; `None` finds it with [`object::locate`].
    pub object: Option<PathBuf>,
    /// How programs are attached.
    pub attach_mode: AttachMode,
    /// Map sizes for maps created by this load (pinned maps that already
    /// exist keep theirs).
    pub map_sizes: MapSizes,
    /// New-pods mode and connection timeouts, written at load. Its mark
    /// fields are ignored: [`Self::mark_mask`] sets them.
    pub global: GlobalConfig,
    /// Bits of `skb->mark` that carry a pod's Service traffic from
    /// `from_pod` to the hook that judges it after kube-proxy's DNAT
    /// (`to_pod`, `leave_node`): one run of contiguous bits
    /// ([`netpol_common::mark::valid`]). Default
    /// [`netpol_common::mark::DEFAULT_MASK`], clear of kube-proxy's
    /// 0x4000/0x8000, kube-router's 0x10000/0x20000 and Tailscale's
    /// 0xff0000.
    pub mark_mask: u32,
    /// Attachments outlive the datapath and its process (the agent): TCX
    /// links are pinned, netlink filters left in place, and a later load
    /// adopts them, swapping its programs in atomically. Off (the default),
    /// dropping the datapath detaches what it attached.
    pub persistent: bool,
}

/// Maximum entries of the maps whose size depends on the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Local pod interfaces.
    pub endpoints: u32,
    /// IPv4 policy prefixes, all endpoints and directions together.
    pub policy_v4: u32,
    /// IPv6 policy prefixes.
    pub policy_v6: u32,
    /// Port-trie entries of all rule sets.
    pub ports: u32,
    /// Tracked connections.
    pub conntrack: u32,
    /// Datagrams being reassembled (first-fragment verdicts).
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            endpoints: 4096,
            policy_v4: 262_144,
            policy_v6: 262_144,
            ports: 65_536,
            conntrack: 262_144,
            fragments: 8192,
        }
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            object: None,
            attach_mode: AttachMode::Auto,
            map_sizes: MapSizes::default(),
            global: GlobalConfig::default(),
            mark_mask: mark::DEFAULT_MASK,
            persistent: false,
        }
    }
}

impl DatapathConfig {
    /// The folder the maps are pinned in: `<bpffs>/netpol`.
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(PIN_SUBDIR)
    }
}

/// `mask` when it is a usable mark mask ([`netpol_common::mark::valid`]).
///
/// # Errors
/// [`DatapathError::MarkMask`], naming the value, otherwise.
pub const fn check_mark_mask(mask: u32) -> Result<u32, DatapathError> {
    if mark::valid(mask) {
        Ok(mask)
    } else {
        Err(DatapathError::MarkMask { mask })
    }
}
