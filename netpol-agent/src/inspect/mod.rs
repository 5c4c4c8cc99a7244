//! Reading the live pinned maps back, decoded, for `netpol-agent inspect`
//! and `netpol-agent explain` ([`explain`]).
//!
//! Everything here reads the kernel's maps under `<bpffs>/netpol` (the
//! agent may be running or dead); names come from the state file
//! ([`crate::provenance`]). The decoding is the inverse of the map
//! writer's encoding (`netpol_common` documents each key):
//! - policy keys: `selector = endpoint id << 1 | direction` (1 ingress,
//!   0 egress), then the peer address; the LPM prefix length is 32 plus
//!   the peer prefix length;
//! - port keys: rule set, then protocol and a zero byte (16 bits), then
//!   the big-endian destination port: prefix length 32 is every protocol
//!   and port, 48 every port of the protocol, `48 + k` the ports sharing
//!   the first `k` bits.
mod compiled;
pub mod diff;
pub mod explain;

pub use compiled::CompiledMaps;

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netpol_common::{
    CtKey, CtValue, EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, GlobalConfig,
    PORT_KEY_PROTOCOL_BITS, PolicyKeyV4, PolicyKeyV6, PolicyValue, PortKey, PortValue,
    SELECTOR_BITS, direction, endpoint_flags, family, maps, protocol, tcp_state,
};
use serde::Serialize;

use crate::compiler::Direction;

/// Why the live maps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A pinned map could not be opened (no agent ever ran with this
    /// bpffs, or another layout).
    #[error("opening the pinned map {path}: {source} (is netpol running with this --bpffs?)")]
    Open {
        /// The pin.
        path: String,
        /// The error.
        source: Box<aya::maps::MapError>,
    },
    /// A lookup or iteration failed.
    #[error("reading {map}: {source}")]
    Read {
        /// The map.
        map: &'static str,
        /// The error.
        source: Box<aya::maps::MapError>,
    },
}

/// Direction of a `netpol_common::direction` code.
#[must_use]
pub const fn direction_of(raw: u32) -> Direction {
    if raw & 1 == direction::INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    }
}

/// `(endpoint id, direction)` of a policy selector.
#[must_use]
pub const fn decode_selector(selector: u32) -> (u32, Direction) {
    (selector >> 1, direction_of(selector))
}

/// Name of an IP protocol number, as policies spell it.
#[must_use]
pub fn protocol_name(p: u8) -> String {
    protocol::name(p).map_or_else(|| format!("proto-{p}"), str::to_owned)
}

/// Parses `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` (any case) or a number.
#[must_use]
pub fn parse_protocol(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(protocol::TCP),
        "udp" => Some(protocol::UDP),
        "sctp" => Some(protocol::SCTP),
        "icmp" => Some(protocol::ICMP),
        "icmpv6" | "ipv6-icmp" => Some(protocol::ICMPV6),
        n => n.parse().ok(),
    }
}

/// A decoded policy-trie entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LiveEntry {
    /// Local endpoint id.
    pub endpoint: u32,
    /// Direction.
    pub direction: Direction,
    /// The key's selector.
    pub selector: u32,
    /// The key's LPM prefix length (32 + peer prefix length).
    pub prefix_len: u32,
    /// Peer prefix.
    pub prefix: IpNet,
    /// Rule set.
    pub ruleset: u32,
}

/// Decodes an IPv4 policy key.
#[must_use]
pub fn decode_policy_v4(prefix_len: u32, key: &PolicyKeyV4, v: PolicyValue) -> LiveEntry {
    let bits = prefix_len.saturating_sub(SELECTOR_BITS).min(32);
    let net = Ipv4Net::new(key.addr.into(), u8::try_from(bits).unwrap_or(32))
        .map_or_else(|_| IpNet::V4(Ipv4Net::default()), |n| IpNet::V4(n.trunc()));
    let (endpoint, direction) = decode_selector(key.selector);
    LiveEntry {
        endpoint,
        direction,
        selector: key.selector,
        prefix_len,
        prefix: net,
        ruleset: v.ruleset,
    }
}

/// Decodes an IPv6 policy key.
#[must_use]
pub fn decode_policy_v6(prefix_len: u32, key: &PolicyKeyV6, v: PolicyValue) -> LiveEntry {
    let bits = prefix_len.saturating_sub(SELECTOR_BITS).min(128);
    let net = Ipv6Net::new(key.addr.into(), u8::try_from(bits).unwrap_or(128))
        .map_or_else(|_| IpNet::V6(Ipv6Net::default()), |n| IpNet::V6(n.trunc()));
    let (endpoint, direction) = decode_selector(key.selector);
    LiveEntry {
        endpoint,
        direction,
        selector: key.selector,
        prefix_len,
        prefix: net,
        ruleset: v.ruleset,
    }
}

/// A decoded port-trie entry: ports `first..=last` of `protocol` (every
/// protocol when `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortBlock {
    /// Rule set.
    pub ruleset: u32,
    /// IP protocol number, `None`: every protocol.
    pub protocol: Option<u8>,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
    /// The value allows (always, as netpol writes them).
    pub allow: bool,
}

/// Decodes a port key.
#[must_use]
pub fn decode_port(prefix_len: u32, key: &PortKey, v: PortValue) -> PortBlock {
    let allow = v.allow != 0;
    if prefix_len <= SELECTOR_BITS {
        return PortBlock {
            ruleset: key.ruleset,
            protocol: None,
            first: 0,
            last: u16::MAX,
            allow,
        };
    }
    let bits = prefix_len.saturating_sub(PORT_KEY_PROTOCOL_BITS).min(16);
    let mask: u16 = if bits == 0 {
        0
    } else {
        u16::MAX << (16 - bits)
    };
    let port = u16::from_be_bytes(key.port);
    PortBlock {
        ruleset: key.ruleset,
        protocol: Some(key.protocol),
        first: port & mask,
        last: (port & mask) | !mask,
        allow,
    }
}

/// Ports of one protocol, `first..=last`, merged from port blocks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortRun {
    /// `TCP`, `UDP`, `SCTP`, ... or `any` (every protocol).
    pub protocol: String,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
    /// Taken out of the `any` run (a `ClusterNetworkPolicy` Deny): not
    /// allowed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub except: bool,
}

/// The allowed ports of each rule set, contiguous blocks merged; blocks
/// written not allowed (under an entry for every protocol) follow as
/// `except` runs.
#[must_use]
pub fn rulesets(blocks: &[PortBlock]) -> BTreeMap<u32, Vec<PortRun>> {
    // (allowed, protocol, first, last) runs of each rule set.
    type Runs = Vec<(bool, Option<u8>, u16, u16)>;
    let mut sorted: Vec<&PortBlock> = blocks.iter().collect();
    // Allowed blocks first, then the exceptions, each in port order.
    sorted.sort_by_key(|b| (b.ruleset, !b.allow, b.protocol, b.first));
    let mut out: BTreeMap<u32, Runs> = BTreeMap::new();
    for b in sorted {
        let runs = out.entry(b.ruleset).or_default();
        match runs.last_mut() {
            Some((allow, p, _, last))
                if *allow == b.allow
                    && *p == b.protocol
                    && u32::from(b.first) <= u32::from(*last) + 1 =>
            {
                *last = (*last).max(b.last);
            }
            _ => runs.push((b.allow, b.protocol, b.first, b.last)),
        }
    }
    out.into_iter()
        .map(|(id, runs)| {
            let runs = runs
                .into_iter()
                .map(|(allow, p, first, last)| PortRun {
                    protocol: p.map_or_else(|| "any".to_owned(), protocol_name),
                    first,
                    last,
                    except: !allow,
                })
                .collect();
            (id, runs)
        })
        .collect()
}

/// `TCP 80, UDP 53, SCTP 1000-1999`, `all protocols and ports`, `all
/// protocols and ports except TCP 80`, or `nothing`.
#[must_use]
pub fn ports_text(runs: &[PortRun]) -> String {
    let text = |r: &PortRun| match (r.protocol.as_str(), r.first, r.last) {
        ("any", _, _) => "all protocols and ports".to_owned(),
        (p, 0, u16::MAX) => format!("{p} all ports"),
        (p, a, b) if a == b => format!("{p} {a}"),
        (p, a, b) => format!("{p} {a}-{b}"),
    };
    let allowed: Vec<String> = runs.iter().filter(|r| !r.except).map(text).collect();
    let except: Vec<String> = runs.iter().filter(|r| r.except).map(text).collect();
    if allowed.is_empty() {
        return "nothing".to_owned();
    }
    if except.is_empty() {
        allowed.join(", ")
    } else {
        format!("{} except {}", allowed.join(", "), except.join(", "))
    }
}

/// An endpoint-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveEndpoint {
    /// Host interface index (the key).
    pub ifindex: u32,
    /// The value.
    pub info: EndpointInfo,
}

impl LiveEndpoint {
    /// Whether the agent has written the pod's policy (not the new-pods
    /// mode).
    #[must_use]
    pub const fn programmed(&self) -> bool {
        self.info.programmed()
    }

    /// Whether the direction is isolated.
    #[must_use]
    pub const fn isolated(&self, d: Direction) -> bool {
        self.info.isolated(d.raw())
    }

    /// The pod's own addresses.
    #[must_use]
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if self.info.flags & endpoint_flags::HAS_IPV4 != 0 {
            out.push(IpAddr::from(self.info.ipv4));
        }
        if self.info.flags & endpoint_flags::HAS_IPV6 != 0 {
            out.push(IpAddr::from(self.info.ipv6));
        }
        out
    }

    /// Names of the set flags.
    #[must_use]
    pub fn flag_names(&self) -> Vec<&'static str> {
        [
            (endpoint_flags::INGRESS_ISOLATED, "ingress_isolated"),
            (endpoint_flags::EGRESS_ISOLATED, "egress_isolated"),
            (endpoint_flags::HAS_IPV4, "has_ipv4"),
            (endpoint_flags::HAS_IPV6, "has_ipv6"),
            (endpoint_flags::NOT_PROGRAMMED, "not_programmed"),
            (endpoint_flags::ALLOW_ANY_SOURCE, "allow_any_source"),
            (endpoint_flags::HAIRPIN_JUDGED, "hairpin_judged"),
            (endpoint_flags::STAGED_INGRESS, "staged_ingress"),
            (endpoint_flags::STAGED_EGRESS, "staged_egress"),
            (
                endpoint_flags::STAGED_INGRESS_ISOLATED,
                "staged_ingress_isolated",
            ),
            (
                endpoint_flags::STAGED_EGRESS_ISOLATED,
                "staged_egress_isolated",
            ),
            (endpoint_flags::STAGED_HAIRPIN, "staged_hairpin"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.info.flags & bit != 0)
        .map(|(_, n)| n)
        .collect()
    }
}

/// A decoded conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The key.
    pub key: CtKey,
    /// The value.
    pub value: CtValue,
}

impl Connection {
    /// `(local, peer)` addresses.
    #[must_use]
    pub fn addresses(&self) -> (IpAddr, IpAddr) {
        let addr = |a: [u8; 16]| {
            if u32::from(self.key.family) == family::IPV4 {
                IpAddr::from([a[0], a[1], a[2], a[3]])
            } else {
                IpAddr::from(a)
            }
        };
        (addr(self.key.local_addr), addr(self.key.peer_addr))
    }

    /// The idle timeout the datapath applies to it.
    #[must_use]
    pub const fn timeout_ns(&self, cfg: &GlobalConfig) -> u64 {
        cfg.ct_timeout_ns(self.key.protocol, self.value.tcp_state)
    }
}

/// Name of a `netpol_common::tcp_state`.
#[must_use]
pub const fn tcp_state_name(s: u32) -> &'static str {
    match s {
        tcp_state::NONE => "-",
        tcp_state::SYN_SENT => "syn_sent",
        tcp_state::ESTABLISHED => "established",
        tcp_state::CLOSING => "closing",
        _ => "unknown",
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a
    // local we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Now on the programs' clock (`cfg`'s clock fields, see
/// `datapath::clock`): what a packet arriving now would stamp, so an
/// entry's idle time is what the programs' own timeout compares, however
/// far jiffies lag `CLOCK_MONOTONIC` at the moment. `CLOCK_MONOTONIC`
/// when the programs read the clock source, or the jiffies cannot be
/// read.
#[must_use]
pub fn programs_now_ns(cfg: &GlobalConfig) -> u64 {
    if cfg.clock_jiffy_ns == 0 {
        return monotonic_ns();
    }
    let clock = crate::datapath::clock::JiffyClock {
        jiffy_ns: cfg.clock_jiffy_ns,
        offset_ns: cfg.clock_offset_ns,
        error_ns: 0,
    };
    crate::datapath::clock::read_jiffies().map_or_else(monotonic_ns, |j| clock.at(j))
}

/// What explain reads from the kernel: the live maps, or a fake in tests.
pub trait Maps {
    /// Every endpoint-map entry.
    ///
    /// # Errors
    /// When the map cannot be read.
    fn endpoints(&self) -> Result<Vec<LiveEndpoint>, InspectError>;
    /// Every policy-trie entry of a family.
    ///
    /// # Errors
    /// When the map cannot be read.
    fn policy_entries(&self, v6: bool) -> Result<Vec<LiveEntry>, InspectError>;
    /// The kernel's longest-prefix match of `(selector, peer)`: the rule
    /// set, if any entry covers the peer.
    ///
    /// # Errors
    /// When the lookup fails for another reason than "no match".
    fn policy_lookup(&self, selector: u32, peer: IpAddr) -> Result<Option<u32>, InspectError>;
    /// Every port-trie entry.
    ///
    /// # Errors
    /// When the map cannot be read.
    fn port_blocks(&self) -> Result<Vec<PortBlock>, InspectError>;
    /// The kernel's longest-prefix match of `(ruleset, protocol, port)`.
    ///
    /// # Errors
    /// When the lookup fails for another reason than "no match".
    fn port_allows(&self, ruleset: u32, protocol: u8, port: u16) -> Result<bool, InspectError>;
    /// The frontend-map value of `(address, port, protocol)`, if any.
    ///
    /// # Errors
    /// When the lookup fails for another reason than "no entry".
    fn frontend(
        &self,
        address: IpAddr,
        port: u16,
        protocol: u8,
    ) -> Result<Option<FrontendValue>, InspectError>;
    /// The config map's entry.
    ///
    /// # Errors
    /// When the map cannot be read.
    fn config(&self) -> Result<GlobalConfig, InspectError>;
}

/// The pinned maps of a running (or dead) agent, opened read-only in
/// spirit: nothing here writes.
pub struct LiveMaps {
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
    policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
    ports: LpmTrie<MapData, PortKey, PortValue>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    frontends_v4: BpfHashMap<MapData, FrontendKeyV4, FrontendValue>,
    frontends_v6: BpfHashMap<MapData, FrontendKeyV6, FrontendValue>,
    config: Array<MapData, GlobalConfig>,
}

impl std::fmt::Debug for LiveMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveMaps").finish_non_exhaustive()
    }
}

fn open<T>(pin_dir: &Path, name: &'static str) -> Result<T, InspectError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = pin_dir.join(name);
    let err = |source| InspectError::Open {
        path: path.display().to_string(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let map = Map::from_map_data(data).map_err(err)?;
    T::try_from(map).map_err(err)
}

fn read_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InspectError {
    move |source| InspectError::Read {
        map,
        source: Box::new(source),
    }
}

/// A lookup's "no such key" as `None`.
fn found<V>(
    r: Result<V, aya::maps::MapError>,
    map: &'static str,
) -> Result<Option<V>, InspectError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(None)
        }
        Err(e) => Err(read_err(map)(e)),
    }
}

impl LiveMaps {
    /// Opens the maps pinned in `pin_dir` (`<bpffs>/netpol`).
    ///
    /// # Errors
    /// [`InspectError::Open`] naming the first map that is missing.
    pub fn open(pin_dir: &Path) -> Result<Self, InspectError> {
        Ok(Self {
            endpoints: open(pin_dir, maps::ENDPOINTS)?,
            policy_v4: open(pin_dir, maps::POLICY_V4)?,
            policy_v6: open(pin_dir, maps::POLICY_V6)?,
            ports: open(pin_dir, maps::PORTS)?,
            conntrack: open(pin_dir, maps::CONNTRACK)?,
            frontends_v4: open(pin_dir, maps::FRONTENDS_V4)?,
            frontends_v6: open(pin_dir, maps::FRONTENDS_V6)?,
            config: open(pin_dir, maps::CONFIG)?,
        })
    }

    /// Every tracked connection (expired ones included: the LRU map keeps
    /// them until reused or evicted).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn connections(&self) -> Result<Vec<Connection>, InspectError> {
        let mut out = Vec::new();
        for kv in &self.conntrack {
            match kv {
                Ok((key, value)) => out.push(Connection { key, value }),
                // An LRU entry evicted while we walk: skip it.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(read_err(maps::CONNTRACK)(e)),
            }
        }
        out.sort_by_key(|c| c.key);
        Ok(out)
    }
}

impl Maps for LiveMaps {
    fn endpoints(&self) -> Result<Vec<LiveEndpoint>, InspectError> {
        let mut out = Vec::new();
        for kv in &self.endpoints {
            let (ifindex, info) = kv.map_err(read_err(maps::ENDPOINTS))?;
            out.push(LiveEndpoint { ifindex, info });
        }
        out.sort_by_key(|e| (e.info.id, e.ifindex));
        Ok(out)
    }

    fn policy_entries(&self, v6: bool) -> Result<Vec<LiveEntry>, InspectError> {
        let mut out = Vec::new();
        if v6 {
            for kv in &self.policy_v6 {
                let (k, v) = kv.map_err(read_err(maps::POLICY_V6))?;
                out.push(decode_policy_v6(k.prefix_len(), &k.data(), v));
            }
        } else {
            for kv in &self.policy_v4 {
                let (k, v) = kv.map_err(read_err(maps::POLICY_V4))?;
                out.push(decode_policy_v4(k.prefix_len(), &k.data(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    fn policy_lookup(&self, selector: u32, peer: IpAddr) -> Result<Option<u32>, InspectError> {
        match peer {
            IpAddr::V4(a) => {
                let key = Key::new(
                    SELECTOR_BITS + 32,
                    PolicyKeyV4 {
                        selector,
                        addr: a.octets(),
                    },
                );
                found(self.policy_v4.get(&key, 0), maps::POLICY_V4).map(|v| v.map(|v| v.ruleset))
            }
            IpAddr::V6(a) => {
                let key = Key::new(
                    SELECTOR_BITS + 128,
                    PolicyKeyV6 {
                        selector,
                        addr: a.octets(),
                    },
                );
                found(self.policy_v6.get(&key, 0), maps::POLICY_V6).map(|v| v.map(|v| v.ruleset))
            }
        }
    }

    fn port_blocks(&self) -> Result<Vec<PortBlock>, InspectError> {
        let mut out = Vec::new();
        for kv in &self.ports {
            let (k, v) = kv.map_err(read_err(maps::PORTS))?;
            out.push(decode_port(k.prefix_len(), &k.data(), v));
        }
        out.sort();
        Ok(out)
    }

    fn port_allows(&self, ruleset: u32, protocol: u8, port: u16) -> Result<bool, InspectError> {
        let key = Key::new(
            PORT_KEY_PROTOCOL_BITS + 16,
            PortKey {
                ruleset,
                protocol,
                _pad: 0,
                port: port.to_be_bytes(),
            },
        );
        found(self.ports.get(&key, 0), maps::PORTS).map(|v| v.is_some_and(|v| v.allow != 0))
    }

    fn frontend(
        &self,
        address: IpAddr,
        port: u16,
        protocol: u8,
    ) -> Result<Option<FrontendValue>, InspectError> {
        let port = port.to_be_bytes();
        match address {
            IpAddr::V4(a) => found(
                self.frontends_v4.get(
                    &FrontendKeyV4 {
                        addr: a.octets(),
                        port,
                        protocol,
                        _pad: 0,
                    },
                    0,
                ),
                maps::FRONTENDS_V4,
            ),
            IpAddr::V6(a) => found(
                self.frontends_v6.get(
                    &FrontendKeyV6 {
                        addr: a.octets(),
                        port,
                        protocol,
                        _pad: 0,
                    },
                    0,
                ),
                maps::FRONTENDS_V6,
            ),
        }
    }

    fn config(&self) -> Result<GlobalConfig, InspectError> {
        self.config.get(&0, 0).map_err(read_err(maps::CONFIG))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::{PortPrefix, PortRange, RuleSet};
    use crate::model::Protocol;

    #[test]
    fn policy_keys_decode_to_endpoint_direction_and_prefix() {
        let k = PolicyKeyV4 {
            selector: netpol_common::policy_selector(5, direction::INGRESS),
            addr: [10, 1, 2, 0],
        };
        let e = decode_policy_v4(SELECTOR_BITS + 24, &k, PolicyValue { ruleset: 9 });
        assert_eq!(
            (e.endpoint, e.direction, e.prefix, e.ruleset),
            (5, Direction::Ingress, "10.1.2.0/24".parse().unwrap(), 9)
        );
        let k = PolicyKeyV6 {
            selector: netpol_common::policy_selector(7, direction::EGRESS),
            addr: "fd00::".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        };
        let e = decode_policy_v6(SELECTOR_BITS, &k, PolicyValue { ruleset: 2 });
        assert_eq!(
            (e.endpoint, e.direction, e.prefix),
            (7, Direction::Egress, "::/0".parse().unwrap())
        );
    }

    /// The compiler's port prefixes of a rule set decode back to its
    /// ranges.
    #[test]
    fn port_keys_decode_back_to_the_rule_sets_ranges() {
        let ranges = vec![
            PortRange {
                protocol: Protocol::Tcp,
                first: 80,
                last: 80,
            },
            PortRange {
                protocol: Protocol::Tcp,
                first: 1000,
                last: 1999,
            },
            PortRange {
                protocol: Protocol::Udp,
                first: 0,
                last: u16::MAX,
            },
        ];
        let rs = RuleSet::from_ranges(ranges);
        let blocks: Vec<PortBlock> = rs
            .port_prefixes()
            .into_iter()
            .map(|p: PortPrefix| {
                let (l, k, v) = p.raw(4);
                decode_port(l, &k, v)
            })
            .collect();
        let runs = &rulesets(&blocks)[&4];
        assert_eq!(ports_text(runs), "TCP 80, TCP 1000-1999, UDP all ports");
        let all: Vec<PortBlock> = RuleSet::allow_all()
            .port_prefixes()
            .into_iter()
            .map(|p| {
                let (l, k, v) = p.raw(6);
                decode_port(l, &k, v)
            })
            .collect();
        assert_eq!(ports_text(&rulesets(&all)[&6]), "all protocols and ports");
        assert_eq!(ports_text(&[]), "nothing");
        // What a ClusterNetworkPolicy Deny takes out of "everything".
        let but: Vec<PortBlock> = RuleSet::all_but(vec![
            PortRange {
                protocol: Protocol::Tcp,
                first: 80,
                last: 80,
            },
            PortRange {
                protocol: Protocol::Udp,
                first: 0,
                last: u16::MAX,
            },
        ])
        .port_prefixes()
        .into_iter()
        .map(|p| {
            let (l, k, v) = p.raw(9);
            decode_port(l, &k, v)
        })
        .collect();
        assert_eq!(
            ports_text(&rulesets(&but)[&9]),
            "all protocols and ports except TCP 80, UDP all ports"
        );
    }

    #[test]
    fn connection_timeouts_follow_protocol_and_tcp_state() {
        let mut c = Connection {
            key: CtKey {
                protocol: protocol::TCP,
                family: 1,
                local_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..CtKey::default()
            },
            value: CtValue {
                tcp_state: tcp_state::SYN_SENT,
                ..CtValue::default()
            },
        };
        let cfg = GlobalConfig {
            ct_tcp_syn_ns: 5,
            ..GlobalConfig::default()
        };
        assert_eq!(c.timeout_ns(&cfg), 5);
        c.value.tcp_state = tcp_state::ESTABLISHED;
        assert_eq!(
            c.timeout_ns(&cfg),
            netpol_common::ct_defaults::TCP_ESTABLISHED_NS
        );
        assert_eq!(c.addresses().0, "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
