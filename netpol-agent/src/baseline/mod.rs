//! A kube-router-style iptables + ipset rendering of a [`Snapshot`], the
//! baseline netpol is benchmarked against (`cargo xtask bench control` and
//! `throughput`). The agent never uses it.
//!
//! The shapes follow kube-router's network policy controller (`pod.go`,
//! `policy.go`), which k3s embeds:
//!
//! - per family, one `hash:ip` set of each policy's target pods
//!   (`KUBE-DST-…` for ingress, `KUBE-SRC-…` for egress), one `hash:ip` set
//!   of each rule's peer pods, one per named port resolved to a number, and
//!   one `hash:net` set of each rule's ipBlocks with the `except` ranges
//!   added as `nomatch`; IPv6 set names carry kube-router's `inet6:` prefix;
//! - `KUBE-ROUTER-{INPUT,FORWARD,OUTPUT}` jumped to from the built-in
//!   chains, jumping per local pod (`-d` its address for ingress, `-s` for
//!   egress) to the pod's `KUBE-POD-FW-<hash>` chain;
//! - the pod chain runs kube-router 2.x's common rules first (`INVALID`
//!   dropped, `RELATED,ESTABLISHED` accepted, the ICMP types every pod
//!   needs accepted: echo, unreachable, time exceeded, IPv6 neighbour
//!   discovery), then (ingress)
//!   traffic from the node itself, then jumps to the `KUBE-NWPLCY-<hash>`
//!   chain of every policy selecting the pod, then drops what no policy
//!   marked (kube-router rejects and logs with NFLOG; both cost only denied
//!   packets, which the benchmarks do not send) and clears the mark;
//! - the policy chain matches the sets and ports, sets mark 0x10000 and
//!   returns.
//!
//! Like kube-router, every policy of the cluster gets its chain and sets,
//! not only those selecting a local pod, and a sync rewrites everything:
//! `ipset restore` (fill a temporary set, swap it in) per family, then
//! `iptables-restore` / `ip6tables-restore` of the whole filter table.
//!
//! The rendering is pure: snapshot in, texts out.

mod render;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::Snapshot;
use render::family;

/// kube-router's "allowed by a policy" mark.
const MARK: &str = "0x10000/0x10000";
const FORWARD: &str = "KUBE-ROUTER-FORWARD";
const INPUT: &str = "KUBE-ROUTER-INPUT";
const OUTPUT: &str = "KUBE-ROUTER-OUTPUT";
/// Rules every pod chain runs first (kube-router 2.x).
const COMMON: &str = "KUBE-NWPLCY-COMMON";

/// The ICMP types kube-router 2.x always accepts for a pod
/// (`utils.CommonICMPRules`): echo request, destination unreachable (path
/// MTU discovery), time exceeded, and on IPv6 neighbour discovery and echo
/// reply too, without which a pod with an isolated egress cannot resolve
/// its gateway.
fn common_icmp(fam: Family) -> &'static [&'static str] {
    match fam {
        Family::V4 => &[
            "-p icmp -m icmp --icmp-type 8",
            "-p icmp -m icmp --icmp-type 3",
            "-p icmp -m icmp --icmp-type 11",
        ],
        Family::V6 => &[
            "-p ipv6-icmp -m icmp6 --icmpv6-type 128",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 1",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 3",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 135",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 136",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 129",
        ],
    }
}

/// Why a snapshot cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaselineError {
    /// Without a local node no pod is local: nothing would be enforced.
    #[error("the snapshot names no local node")]
    NoLocalNode,
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn has(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }

    fn has_net(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }

    /// ipset's `family` option.
    #[must_use]
    pub const fn ipset(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    /// kube-router's set-name prefix for the family.
    const fn set_prefix(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => "inet6:",
        }
    }
}

/// The texts of one sync, per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyRules {
    /// Input for `ipset restore`.
    pub ipset: String,
    /// Input for `iptables-restore` (`ip6tables-restore` for IPv6): the
    /// whole filter table.
    pub iptables: String,
    /// Sets, set entries, chains and rules in the texts.
    pub stats: Stats,
}

/// Sizes of one family's rendering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub sets: usize,
    pub set_entries: usize,
    pub chains: usize,
    pub rules: usize,
}

/// Both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    pub v4: FamilyRules,
    pub v6: FamilyRules,
}

impl Baseline {
    #[must_use]
    pub fn family(&self, f: Family) -> &FamilyRules {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// Renders the snapshot as kube-router would program it on the local node.
///
/// # Errors
/// [`BaselineError::NoLocalNode`] when the snapshot names no local node.
pub fn generate(snap: &Snapshot) -> Result<Baseline, BaselineError> {
    let node = snap.local_node_name().ok_or(BaselineError::NoLocalNode)?;
    Ok(Baseline {
        v4: family(snap, node, Family::V4),
        v6: family(snap, node, Family::V6),
    })
}

/// kube-router names chains and sets after a hash (base32 of sha256, 16
/// characters); any stable hash gives the same shape. Two FNV-1a passes
/// make 80 bits, plenty against collisions between a cluster's names.
fn hash(parts: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        let mut h = seed;
        for p in parts {
            for b in p.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142));
    let bits = (u128::from(a) << 64) | u128::from(b);
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

/// What removes a baseline from a network namespace: an empty filter table
/// (for `iptables-restore`), then the sets (for `ipset restore`, after the
/// rules referencing them are gone).
#[must_use]
pub fn empty_filter_table() -> &'static str {
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
}
