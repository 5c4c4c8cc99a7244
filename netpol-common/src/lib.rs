//! Map keys and values shared by the netpol TC programs and the agent.
//!
//! Every type here crosses the user/kernel boundary, so each is `#[repr(C)]`
//! with explicit padding, uses integer codes rather than Rust enums, and has a
//! test pinning its size and field offsets. The kernel side builds this crate
//! `no_std` without features; the agent enables `user` for the `aya::Pod`
//! impls.
#![no_std]

/// Names of the maps in the eBPF object. The agent pins each under its bpffs
/// folder with the same file name.
pub mod maps {
    /// Per-CPU array of [`crate::TrafficCounter`], indexed by [`crate::counter_index`].
    pub const COUNTERS: &str = "NETPOL_COUNTERS";
    /// Hash `u32 ifindex` → [`crate::EndpointInfo`].
    pub const ENDPOINTS: &str = "NETPOL_ENDPOINTS";
    /// Array of one `u64`: the [`crate::endpoint_epoch`], moved by the
    /// agent after every write to [`ENDPOINTS`].
    pub const ENDPOINT_EPOCH: &str = "NETPOL_EP_EPOCH";
    /// Per-CPU array `u32 ifindex` → [`crate::EndpointCacheEntry`]: each
    /// CPU's copies of [`ENDPOINTS`] entries, written by the programs only.
    /// Not pinned: every load starts with an empty one.
    pub const ENDPOINT_CACHE: &str = "NETPOL_EP_CACHE";
    /// LPM trie `Key<`[`crate::PolicyKeyV4`]`>` → [`crate::PolicyValue`].
    pub const POLICY_V4: &str = "NETPOL_POLICY_V4";
    /// LPM trie `Key<`[`crate::PolicyKeyV6`]`>` → [`crate::PolicyValue`].
    pub const POLICY_V6: &str = "NETPOL_POLICY_V6";
    /// LPM trie `Key<`[`crate::PortKey`]`>` → [`crate::PortValue`].
    pub const PORTS: &str = "NETPOL_PORTS";
    /// LRU hash [`crate::CtKey`] → [`crate::CtValue`]: connections each
    /// endpoint admitted.
    pub const CONNTRACK: &str = "NETPOL_CONNTRACK";
    /// Array of one [`crate::GlobalConfig`].
    pub const CONFIG: &str = "NETPOL_CONFIG";
    /// LRU hash [`crate::FragKey`] → [`crate::FragValue`].
    pub const FRAGMENTS: &str = "NETPOL_FRAGMENTS";
    /// Hash [`crate::FrontendKeyV4`] → [`crate::FrontendValue`]: the IPv4
    /// Service frontends kube-proxy translates.
    pub const FRONTENDS_V4: &str = "NETPOL_FRONTENDS_V4";
    /// Hash [`crate::FrontendKeyV6`] → [`crate::FrontendValue`].
    pub const FRONTENDS_V6: &str = "NETPOL_FRONTENDS_V6";
    /// Array `mark slot` → `u32` host ifindex of the pod interface that
    /// owns the slot (0: free). See [`crate::mark`].
    pub const MARK_SOURCES: &str = "NETPOL_MARK_SOURCES";
    /// Ring buffer of [`crate::DenyEvent`]s: one per dropped packet the
    /// endpoint's rate limit lets through (see [`crate::events`]).
    pub const EVENTS: &str = "NETPOL_EVENTS";
    /// LRU hash `u32 endpoint id` → [`crate::EventBucket`]: each
    /// endpoint's event rate limit.
    pub const EVENT_LIMITS: &str = "NETPOL_EVENT_LIMITS";
    /// Per-CPU array of `u64`, indexed by [`crate::events::LOST_RATE_LIMITED`]
    /// and [`crate::events::LOST_RING_FULL`]: events not emitted.
    pub const EVENTS_LOST: &str = "NETPOL_EVENTS_LOST";

    /// Every map, in the order the agent pins them.
    pub const ALL: [&str; 15] = [
        COUNTERS,
        ENDPOINTS,
        ENDPOINT_EPOCH,
        POLICY_V4,
        POLICY_V6,
        PORTS,
        CONNTRACK,
        CONFIG,
        FRAGMENTS,
        FRONTENDS_V4,
        FRONTENDS_V6,
        MARK_SOURCES,
        EVENTS,
        EVENT_LIMITS,
        EVENTS_LOST,
    ];
}

/// Names of the two TC programs.
pub mod programs {
    /// Host-side veth TC ingress: packets leaving the pod, i.e. the pod's egress.
    pub const FROM_POD: &str = "from_pod";
    /// Host-side veth TC egress: packets entering the pod, i.e. the pod's ingress.
    pub const TO_POD: &str = "to_pod";
    /// TC egress of the node's other devices (uplink, tunnels): judges the
    /// pods' Service traffic whose backend is on another node.
    pub const LEAVE_NODE: &str = "leave_node";
    /// [`LEAVE_NODE`] for devices without an Ethernet header (WireGuard,
    /// IPIP).
    pub const LEAVE_NODE_L3: &str = "leave_node_l3";
    /// cgroup-skb ingress of the root cgroup v2: judges a pod's Service
    /// traffic whose backend is one of the node's own addresses.
    pub const TO_HOST: &str = "to_host";
}

/// Version of the layout of every pinned map. Bumped whenever a key or value
/// type, a map's type or the counter index scheme changes, so that an agent
/// finding maps of another layout knows it cannot reuse them as they are.
pub const LAYOUT_VERSION: u32 = 4;

/// Policy direction, seen from the pod.
pub mod direction {
    /// Traffic leaving the pod (`from_pod`, host veth TC ingress).
    pub const EGRESS: u32 = 0;
    /// Traffic entering the pod (`to_pod`, host veth TC egress).
    pub const INGRESS: u32 = 1;
    /// Number of directions.
    pub const COUNT: u32 = 2;

    /// The direction's name, as a policy's field (`egress`, `ingress`).
    #[must_use]
    pub const fn name(d: u32) -> &'static str {
        match d {
            EGRESS => "egress",
            INGRESS => "ingress",
            _ => "unknown",
        }
    }
}

/// Address family of a packet, as counted.
pub mod family {
    /// Not IP (ARP, LLDP, ...).
    pub const OTHER: u32 = 0;
    /// IPv4.
    pub const IPV4: u32 = 1;
    /// IPv6.
    pub const IPV6: u32 = 2;
    /// Number of families.
    pub const COUNT: u32 = 3;

    /// The family's name in logs, metrics and `stats`.
    #[must_use]
    pub const fn name(f: u32) -> &'static str {
        match f {
            IPV4 => "ipv4",
            IPV6 => "ipv6",
            OTHER => "other",
            _ => "unknown",
        }
    }
}

/// Why a packet got its verdict. One table for passes and drops: it is the
/// counter index and the metric label set. Numbers are never reused; retired
/// reasons keep their slot.
pub mod reason {
    /// Passed: the interface has no endpoint entry (not managed by netpol).
    pub const PASS_UNMANAGED: u32 = 0;
    /// Passed: the endpoint is not isolated in this direction.
    pub const PASS_NOT_ISOLATED: u32 = 1;
    /// Passed: the packet belongs to a tracked connection (or is a reply).
    pub const PASS_TRACKED: u32 = 2;
    /// Passed: a policy rule allows the peer and port.
    pub const PASS_POLICY: u32 = 3;
    /// Passed: IPv6 neighbour discovery, router messages or MLD.
    pub const PASS_ICMPV6_CONTROL: u32 = 4;
    /// Passed: sent by the node itself to its pod (kubelet probes).
    pub const PASS_NODE_ORIGIN: u32 = 5;
    /// Passed: not an IP packet (ARP).
    pub const PASS_NON_IP: u32 = 6;
    /// Passed: the pod interface is not programmed yet and the new-pods mode
    /// is fail-open.
    pub const PASS_NEW_POD_OPEN: u32 = 7;
    /// Passed: an ICMP error about a tracked connection.
    pub const PASS_RELATED: u32 = 8;
    /// Passed: a later fragment of an allowed first fragment.
    pub const PASS_FRAGMENT: u32 = 9;
    /// Passed, marked: a packet of an egress-isolated pod to a Service
    /// frontend, judged once kube-proxy has chosen the backend (at the
    /// backend's `to_pod` or at `leave_node`).
    pub const PASS_SERVICE: u32 = 10;
    /// Passed: a pod reaching itself through one of its Services (hairpin);
    /// a pod's traffic to itself is not subject to its policies.
    pub const PASS_HAIRPIN: u32 = 11;

    /// First drop reason; everything at or above it is a drop.
    pub const FIRST_DROP: u32 = 64;
    /// Dropped: the endpoint is isolated and no rule matches.
    pub const DROP_POLICY: u32 = 64;
    /// Dropped: headers could not be parsed for an isolated endpoint.
    pub const DROP_PARSE: u32 = 65;
    /// Dropped: the pod interface is not programmed yet (fail-closed new pods).
    pub const DROP_NOT_PROGRAMMED: u32 = 66;
    /// Retired (IPv6 extension headers are walked now); never reused.
    pub const DROP_IPV6_EXTENSION: u32 = 67;
    /// Dropped: a later fragment whose first fragment was not seen (or was
    /// denied), for an isolated endpoint.
    pub const DROP_FRAGMENT: u32 = 68;
    /// Dropped: a first fragment too short to hold the transport ports.
    pub const DROP_FRAGMENT_SHORT: u32 = 69;
    /// Dropped: a fragment overlapping one already seen.
    pub const DROP_FRAGMENT_OVERLAP: u32 = 70;
    /// Dropped: sent by a pod from an address that is not its own.
    pub const DROP_SPOOFED: u32 = 71;
    /// Dropped: a tracked connection the endpoint's new policy no longer
    /// allows.
    pub const DROP_REVOKED: u32 = 72;
    /// Dropped: a packet marked for judgement after Service translation
    /// whose mark names no current pod interface (the pod is gone, or the
    /// mark is not netpol's).
    pub const DROP_MARK_STALE: u32 = 73;

    /// Slots per (direction, family) in the counter array.
    pub const SLOTS: u32 = 128;

    /// Whether `reason` is a drop.
    #[must_use]
    pub const fn is_drop(reason: u32) -> bool {
        reason >= FIRST_DROP
    }

    /// Stable name of a reason, used as a metric label and in `stats` output.
    #[must_use]
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            PASS_UNMANAGED => "pass_unmanaged",
            PASS_NOT_ISOLATED => "pass_not_isolated",
            PASS_TRACKED => "pass_tracked",
            PASS_POLICY => "pass_policy",
            PASS_ICMPV6_CONTROL => "pass_icmpv6_control",
            PASS_NODE_ORIGIN => "pass_node_origin",
            PASS_NON_IP => "pass_non_ip",
            PASS_NEW_POD_OPEN => "pass_new_pod_open",
            PASS_RELATED => "pass_related",
            PASS_FRAGMENT => "pass_fragment",
            PASS_SERVICE => "pass_service",
            PASS_HAIRPIN => "pass_hairpin",
            DROP_POLICY => "drop_policy",
            DROP_PARSE => "drop_parse",
            DROP_NOT_PROGRAMMED => "drop_not_programmed",
            DROP_IPV6_EXTENSION => "drop_ipv6_extension",
            DROP_FRAGMENT => "drop_fragment",
            DROP_FRAGMENT_SHORT => "drop_fragment_short",
            DROP_FRAGMENT_OVERLAP => "drop_fragment_overlap",
            DROP_SPOOFED => "drop_spoofed",
            DROP_REVOKED => "drop_revoked",
            DROP_MARK_STALE => "drop_mark_stale",
            _ => "unknown",
        }
    }
}

/// Number of entries of the counter array.
pub const COUNTER_ENTRIES: u32 = direction::COUNT * family::COUNT * reason::SLOTS;

/// Index into [`maps::COUNTERS`] for a direction, family and reason.
///
/// Out-of-range inputs are clamped into the last slot of their range rather
/// than indexing outside the array: the eBPF side cannot panic.
#[inline(always)]
#[must_use]
pub const fn counter_index(direction: u32, family: u32, reason: u32) -> u32 {
    let d = if direction < direction::COUNT {
        direction
    } else {
        direction::COUNT - 1
    };
    let f = if family < family::COUNT {
        family
    } else {
        family::OTHER
    };
    let r = if reason < reason::SLOTS {
        reason
    } else {
        reason::SLOTS - 1
    };
    (d * family::COUNT + f) * reason::SLOTS + r
}

/// Packets and bytes seen, one per CPU per counter index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (`skb->len`, link layer included).
    pub bytes: u64,
}

/// Flags of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// The pod is isolated for ingress.
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    /// The pod is isolated for egress.
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    /// The pod has an IPv4 address.
    pub const HAS_IPV4: u32 = 1 << 2;
    /// The pod has an IPv6 address.
    pub const HAS_IPV6: u32 = 1 << 3;
    /// The agent knows the interface is a pod's but has not compiled its
    /// policy yet: the datapath applies the new-pods mode.
    pub const NOT_PROGRAMMED: u32 = 1 << 4;
    /// The pod may send from addresses that are not its own (it routes
    /// other addresses: the documented `netpol.io/allow-any-source`
    /// annotation); `from_pod` skips its anti-spoofing check.
    pub const ALLOW_ANY_SOURCE: u32 = 1 << 5;
}

/// Value of [`maps::ENDPOINTS`], keyed by the host-side interface index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint id, stable while the pod lives; never 0.
    pub id: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
    /// Policy generation of the endpoint's ingress: changes whenever what
    /// its ingress allows changes. Connections record it when admitted and
    /// are re-checked against policy when it has moved (revocation).
    pub ingress_gen: u32,
    /// The same for egress.
    pub egress_gen: u32,
    /// The pod's IPv4 address (Kubernetes gives a pod at most one per
    /// family), valid when `HAS_IPV4` is set: `from_pod` drops packets
    /// sent from any other address.
    pub ipv4: [u8; 4],
    /// The pod's IPv6 address, valid when `HAS_IPV6` is set.
    pub ipv6: [u8; 16],
    /// The interface's mark slot (see [`mark`]), written by the map writer
    /// (the compiler leaves it 0); 0: none, so the pod's Service traffic
    /// cannot be marked and is judged at the frontend address.
    pub slot: u32,
}

impl EndpointInfo {
    /// Whether the agent has compiled the pod's policy into the entry (not
    /// an interface waiting for its pod: [`endpoint_flags::NOT_PROGRAMMED`]).
    #[inline(always)]
    #[must_use]
    pub const fn programmed(&self) -> bool {
        self.flags & endpoint_flags::NOT_PROGRAMMED == 0
    }

    /// Whether some policy selects the pod for `dir` ([`direction`]).
    #[inline(always)]
    #[must_use]
    pub const fn isolated(&self, dir: u32) -> bool {
        let bit = if dir == direction::INGRESS {
            endpoint_flags::INGRESS_ISOLATED
        } else {
            endpoint_flags::EGRESS_ISOLATED
        };
        self.flags & bit != 0
    }
}

/// Interfaces with an index below this have a slot in
/// [`maps::ENDPOINT_CACHE`]; the others are always looked up in
/// [`maps::ENDPOINTS`].
pub const ENDPOINT_CACHE_SLOTS: u32 = 4096;

/// Value of [`maps::ENDPOINT_CACHE`]: a copy of an [`EndpointInfo`] taken
/// while [`maps::ENDPOINT_EPOCH`] held `epoch`. Valid only while it still
/// does, and only with a non-zero `info.id` (an empty slot is all zeros).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCacheEntry {
    pub epoch: u64,
    pub info: EndpointInfo,
}

/// The values of [`maps::ENDPOINT_EPOCH`]: the reflected Gray code of a
/// count of endpoint writes. Consecutive values differ in one bit, so a
/// program reading the word while the agent's (byte-wise, not atomic)
/// map update replaces it sees the old value or the new one, never a mix
/// that could equal an older epoch and revive a stale cached copy.
pub mod endpoint_epoch {
    /// The epoch after `epoch`.
    #[must_use]
    pub const fn next(epoch: u64) -> u64 {
        gray(count(epoch).wrapping_add(1))
    }

    /// The `n`th epoch.
    #[must_use]
    pub const fn gray(n: u64) -> u64 {
        n ^ (n >> 1)
    }

    /// How many steps from 0 `epoch` is (the inverse of [`gray`]).
    #[must_use]
    pub const fn count(epoch: u64) -> u64 {
        let mut n = epoch;
        let mut shift = 1;
        while shift < 64 {
            n ^= n >> shift;
            shift <<= 1;
        }
        n
    }
}

/// The 32-bit selector that starts every policy key: an endpoint and a
/// direction. Always matched in full (every prefix length ≥ 32), so its byte
/// order does not matter to the trie; it is stored native-endian.
#[inline(always)]
#[must_use]
pub const fn policy_selector(endpoint_id: u32, direction: u32) -> u32 {
    (endpoint_id << 1) | (direction & 1)
}

/// Bits of the selector at the start of every policy and port key.
pub const SELECTOR_BITS: u32 = 32;

/// Data of an IPv4 policy LPM key. The trie's prefix length covers the
/// selector (always all 32 bits) then the first bits of `addr`, so
/// `prefix_len = 32 + peer prefix length` (32..=64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyV4 {
    /// [`policy_selector`] of the local endpoint and direction.
    pub selector: u32,
    /// Peer address, network byte order.
    pub addr: [u8; 4],
}

/// Data of an IPv6 policy LPM key: selector then peer address;
/// `prefix_len = 32 + peer prefix length` (32..=160).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyV6 {
    /// [`policy_selector`] of the local endpoint and direction.
    pub selector: u32,
    /// Peer address, network byte order.
    pub addr: [u8; 16],
}

/// Value of both policy tries: the rule set (protocols and ports) that the
/// matched peer prefix may use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// Rule-set id, the selector of [`PortKey`]; never 0.
    pub ruleset: u32,
}

/// Data of a port LPM key. The prefix covers `ruleset` (32 bits, always),
/// then optionally `protocol` and `_pad` (16 bits: the rule names a
/// protocol), then the first bits of `port`:
/// - `prefix_len = 32`: every protocol and port (a rule without ports);
/// - `prefix_len = 48`: every port of `protocol`;
/// - `prefix_len = 48 + k`: ports sharing the first `k` bits with `port`.
///
/// Lookups use the packet's protocol and destination port (0 for protocols
/// without ports), with `_pad` zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Rule-set id from [`PolicyValue`]; native-endian, always matched in full.
    pub ruleset: u32,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    /// Always 0; matched with the protocol so that the port starts on a
    /// byte boundary.
    pub _pad: u8,
    /// Destination port, network byte order.
    pub port: [u8; 2],
}

/// Bits of [`PortKey`] before `port`.
pub const PORT_KEY_PROTOCOL_BITS: u32 = 48;

/// Value of the port trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortValue {
    /// Non-zero: allowed. Kept as a word so that later versions can carry a
    /// rule reference without changing the value size.
    pub allow: u32,
}

/// IP protocol numbers the datapath distinguishes.
pub mod protocol {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;

    /// The protocol's name as policies spell it (`TCP`, `ICMPv6`); `None`
    /// for a number netpol gives no name.
    #[must_use]
    pub const fn name(p: u8) -> Option<&'static str> {
        match p {
            TCP => Some("TCP"),
            UDP => Some("UDP"),
            SCTP => Some("SCTP"),
            ICMP => Some("ICMP"),
            ICMPV6 => Some("ICMPv6"),
            _ => None,
        }
    }
}

/// Flags of [`GlobalConfig::flags`].
pub mod config_flags {
    /// Pod interfaces the agent has not programmed yet pass everything
    /// (otherwise only neighbour discovery and node traffic pass).
    pub const NEW_PODS_FAIL_OPEN: u32 = 1 << 0;
    /// Benchmarks only: do not record admitted connections, so that every
    /// repeat of a packet takes the new-flow path. Honoured only by the
    /// object built with the `bench` feature; the production object has no
    /// code reading it.
    pub const BENCH_NO_TRACK: u32 = 1 << 31;
}

/// Default connection timeouts, used when [`GlobalConfig`] holds 0.
pub mod ct_defaults {
    const S: u64 = 1_000_000_000;
    /// TCP before the handshake completes (half-open).
    pub const TCP_SYN_NS: u64 = 30 * S;
    /// TCP established, and SCTP.
    pub const TCP_ESTABLISHED_NS: u64 = 3_600 * S;
    /// TCP after a FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * S;
    /// UDP.
    pub const UDP_NS: u64 = 120 * S;
    /// ICMP echo and any other protocol.
    pub const OTHER_NS: u64 = 30 * S;
    /// Fragments of one datagram.
    pub const FRAGMENT_NS: u64 = 10 * S;
}

/// TCP states kept in [`CtValue::tcp_state`].
pub mod tcp_state {
    /// Not TCP.
    pub const NONE: u32 = 0;
    /// A SYN was seen, the handshake is not complete.
    pub const SYN_SENT: u32 = 1;
    /// Past the handshake (or picked up mid-flow).
    pub const ESTABLISHED: u32 = 2;
    /// A FIN or RST was seen.
    pub const CLOSING: u32 = 3;
}

/// The one entry of [`maps::CONFIG`], written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// [`config_flags`].
    pub flags: u32,
    /// Nanoseconds per jiffy (10⁹ / the kernel's `HZ`), measured by the
    /// agent: the programs' clock is then `bpf_jiffies64` scaled to
    /// `CLOCK_MONOTONIC` with [`GlobalConfig::clock_offset_ns`], a read of
    /// a variable where `bpf_ktime_get_ns` reads the clock source (a tenth
    /// of a connection's run time on a VM). 0: `bpf_ktime_get_ns`.
    pub clock_jiffy_ns: u32,
    /// Half-open TCP; 0: [`ct_defaults::TCP_SYN_NS`].
    pub ct_tcp_syn_ns: u64,
    /// Established TCP and SCTP; 0: [`ct_defaults::TCP_ESTABLISHED_NS`].
    pub ct_tcp_established_ns: u64,
    /// Closing TCP; 0: [`ct_defaults::TCP_CLOSING_NS`].
    pub ct_tcp_closing_ns: u64,
    /// UDP; 0: [`ct_defaults::UDP_NS`].
    pub ct_udp_ns: u64,
    /// Anything else; 0: [`ct_defaults::OTHER_NS`].
    pub ct_other_ns: u64,
    /// Bits of `skb->mark` netpol owns (see [`mark`]); 0: Service traffic
    /// is not marked, frontends are judged as plain destinations.
    pub mark_mask: u32,
    /// Position of the lowest bit of `mark_mask`.
    pub mark_shift: u32,
    /// Deny events per second each endpoint may emit; 0:
    /// [`events::DEFAULT_RATE`], above [`events::MAX_RATE`]: that.
    pub event_rate: u32,
    /// Deny events an endpoint may emit at once after a quiet spell; 0:
    /// [`events::DEFAULT_BURST`], above [`events::MAX_BURST`]: that.
    pub event_burst: u32,
    /// `CLOCK_MONOTONIC` ns at jiffy 0 (wrapping): the programs' clock is
    /// `jiffies × clock_jiffy_ns + clock_offset_ns`, mod 2⁶⁴.
    pub clock_offset_ns: u64,
}

impl GlobalConfig {
    /// The idle timeout of a tracked connection of `protocol` in
    /// `tcp_state` (a [`tcp_state`] value): the set field, else its
    /// [`ct_defaults`] value. The programs expire entries by it and
    /// `inspect` shows it.
    #[inline(always)]
    #[must_use]
    pub const fn ct_timeout_ns(&self, protocol: u8, tcp_state: u32) -> u64 {
        const fn pick(set: u64, default: u64) -> u64 {
            if set == 0 { default } else { set }
        }
        match (protocol, tcp_state) {
            (protocol::TCP, tcp_state::SYN_SENT) => {
                pick(self.ct_tcp_syn_ns, ct_defaults::TCP_SYN_NS)
            }
            (protocol::TCP, tcp_state::CLOSING) => {
                pick(self.ct_tcp_closing_ns, ct_defaults::TCP_CLOSING_NS)
            }
            (protocol::TCP | protocol::SCTP, _) => {
                pick(self.ct_tcp_established_ns, ct_defaults::TCP_ESTABLISHED_NS)
            }
            (protocol::UDP, _) => pick(self.ct_udp_ns, ct_defaults::UDP_NS),
            _ => pick(self.ct_other_ns, ct_defaults::OTHER_NS),
        }
    }
}

/// Deny events: the programs report dropped packets on the
/// [`maps::EVENTS`] ring buffer, at most [`GlobalConfig::event_rate`] per
/// second and endpoint after a burst of [`GlobalConfig::event_burst`] (a
/// token bucket per endpoint id in [`maps::EVENT_LIMITS`]). Events the
/// limit refuses, or that find the ring full, are counted in
/// [`maps::EVENTS_LOST`]; the packet's verdict never depends on either.
pub mod events {
    use super::EventBucket;

    /// Default [`super::GlobalConfig::event_rate`].
    pub const DEFAULT_RATE: u32 = 10;
    /// Default [`super::GlobalConfig::event_burst`].
    pub const DEFAULT_BURST: u32 = 50;
    /// Highest rate honoured (events per second and endpoint).
    pub const MAX_RATE: u32 = 100_000;
    /// Highest burst honoured.
    pub const MAX_BURST: u32 = 10_000;
    /// [`super::maps::EVENTS_LOST`] slot: refused by the rate limit.
    pub const LOST_RATE_LIMITED: u32 = 0;
    /// [`super::maps::EVENTS_LOST`] slot: the ring buffer was full (the
    /// agent reads too slowly, or is not running).
    pub const LOST_RING_FULL: u32 = 1;
    /// Entries of [`super::maps::EVENTS_LOST`].
    pub const LOST_ENTRIES: u32 = 2;
    /// Bytes of the ring buffer (a power of two, whole pages): 4096 events.
    pub const RING_BYTES: u32 = 256 * 1024;
    /// What one event costs in [`EventBucket::tokens`]: a bucket gains
    /// `rate` units per nanosecond, so one event per `1 / rate` seconds.
    pub const COST: u64 = 1_000_000_000;
    /// Refill considered at most (ns): enough to fill the largest burst at
    /// the lowest rate, and small enough that `elapsed * rate` fits a u64.
    const MAX_REFILL_NS: u64 = MAX_BURST as u64 * COST;

    /// The rate in force for a configured value.
    #[inline(always)]
    #[must_use]
    pub const fn rate(configured: u32) -> u64 {
        (match configured {
            0 => DEFAULT_RATE,
            r if r > MAX_RATE => MAX_RATE,
            r => r,
        }) as u64
    }

    /// The burst in force for a configured value.
    #[inline(always)]
    #[must_use]
    pub const fn burst(configured: u32) -> u64 {
        (match configured {
            0 => DEFAULT_BURST,
            b if b > MAX_BURST => MAX_BURST,
            b => b,
        }) as u64
    }

    /// The bucket of an endpoint's first event at `now_ns`, that event
    /// taken: a full burst minus one.
    #[inline(always)]
    #[must_use]
    pub const fn first(now_ns: u64, burst_configured: u32) -> EventBucket {
        EventBucket {
            tokens: (burst(burst_configured) - 1) * COST,
            last_ns: now_ns,
        }
    }

    /// Refills `bucket` for the time since it was last used and takes one
    /// event from it; whether the event may be emitted. Integer-only, no
    /// division, no overflow: tokens stay ≤ `MAX_BURST * COST` (10¹³) and
    /// the refill ≤ `MAX_REFILL_NS * MAX_RATE` (10¹⁸).
    #[inline(always)]
    pub const fn take(
        bucket: &mut EventBucket,
        now_ns: u64,
        rate_configured: u32,
        burst_configured: u32,
    ) -> bool {
        let cap = burst(burst_configured) * COST;
        let elapsed = now_ns.saturating_sub(bucket.last_ns);
        let elapsed = if elapsed > MAX_REFILL_NS {
            MAX_REFILL_NS
        } else {
            elapsed
        };
        let held = if bucket.tokens > cap {
            cap
        } else {
            bucket.tokens
        };
        let refilled = held + elapsed * rate(rate_configured);
        let tokens = if refilled > cap { cap } else { refilled };
        bucket.last_ns = now_ns;
        if tokens >= COST {
            bucket.tokens = tokens - COST;
            true
        } else {
            bucket.tokens = tokens;
            false
        }
    }
}

/// Value of [`maps::EVENT_LIMITS`]: one endpoint's token bucket (see
/// [`events::take`]). Updated without atomics: two CPUs racing on one
/// endpoint may let an event or two more through, never fewer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    /// Tokens held, in [`events::COST`] units per event.
    pub tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

/// One dropped packet, as the programs report it on [`maps::EVENTS`].
/// Addresses and ports are the packet's own (source → destination), not
/// oriented from the endpoint; `endpoint` is the endpoint whose policy
/// `direction` dropped it (the destination pod's for ingress, the source
/// pod's for egress, also when a Service packet is judged at the
/// backend's `to_pod` or at `leave_node`); 0 when no endpoint is known
/// (`DROP_MARK_STALE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`, the node's).
    pub timestamp_ns: u64,
    /// Endpoint id (see above).
    pub endpoint: u32,
    /// `skb->ifindex`: the interface the program ran on.
    pub ifindex: u32,
    /// [`reason`] (a drop).
    pub reason: u32,
    /// [`direction`] of the policy that dropped it.
    pub direction: u8,
    /// [`family`] code.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// ICMP/ICMPv6 type, 0 otherwise.
    pub icmp_type: u8,
    /// Source port, host byte order (ICMP echo: the id; 0 without ports).
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// Source address (IPv4 in the first 4 bytes, the rest zero).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Always 0.
    pub _pad: u32,
}

/// The `skb->mark` bits that carry a pod's Service traffic from its
/// `from_pod`, where the destination is still the Service's frontend, to
/// the hook that sees the backend kube-proxy chose.
///
/// The field `(mark & mask) >> shift` holds the source interface's slot
/// (1..=[`mark::slots`]); 0 means "not marked". The slot, not the packet's
/// source address, names the source pod, because kube-proxy masquerades a
/// pod reaching its own Service. The default mask keeps clear of
/// kube-proxy's 0x4000/0x8000, kube-router's 0x10000/0x20000, flannel's and
/// Weave's bits and Tailscale's 0xff0000.
pub mod mark {
    /// Default mask: bits 24–31, 255 slots.
    pub const DEFAULT_MASK: u32 = 0xff00_0000;
    /// Slots the `MARK_SOURCES` array holds (slot 0 unused).
    pub const MAX_SLOTS: u32 = 4095;

    /// Shift of a mask: the position of its lowest set bit (0 for 0).
    #[must_use]
    pub const fn shift(mask: u32) -> u32 {
        if mask == 0 { 0 } else { mask.trailing_zeros() }
    }

    /// Slots a mask can carry, at most [`MAX_SLOTS`].
    #[must_use]
    pub const fn slots(mask: u32) -> u32 {
        let n = mask >> shift(mask);
        if n > MAX_SLOTS { MAX_SLOTS } else { n }
    }

    /// Whether `mask` is usable: non-empty, one run of contiguous bits.
    #[must_use]
    pub const fn valid(mask: u32) -> bool {
        if mask == 0 {
            return false;
        }
        let n = mask >> shift(mask);
        n & (n.wrapping_add(1)) == 0
    }

    /// The slot a mark carries (0: none).
    #[inline(always)]
    #[must_use]
    pub const fn slot_of(mark: u32, mask: u32, shift: u32) -> u32 {
        (mark & mask) >> (shift & 31)
    }

    /// `mark` with its netpol bits set to `slot`.
    #[inline(always)]
    #[must_use]
    pub const fn with_slot(mark: u32, mask: u32, shift: u32, slot: u32) -> u32 {
        (mark & !mask) | ((slot << (shift & 31)) & mask)
    }
}

/// Kinds of [`FrontendValue::kind`].
pub mod frontend_kind {
    /// A `spec.clusterIPs` address.
    pub const CLUSTER_IP: u32 = 1;
    /// A `spec.externalIPs` address.
    pub const EXTERNAL_IP: u32 = 2;
    /// One of this node's addresses with a `nodePort`.
    pub const NODE_PORT: u32 = 3;
    /// A `status.loadBalancer.ingress[].ip`.
    pub const LOAD_BALANCER: u32 = 4;
}

/// Key of [`maps::FRONTENDS_V4`]: an address, port and protocol kube-proxy
/// translates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKeyV4 {
    /// Frontend address, network byte order.
    pub addr: [u8; 4],
    /// Frontend port, network byte order.
    pub port: [u8; 2],
    /// IP protocol number.
    pub protocol: u8,
    /// Always 0.
    pub _pad: u8,
}

/// Key of [`maps::FRONTENDS_V6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKeyV6 {
    /// Frontend address, network byte order.
    pub addr: [u8; 16],
    /// Frontend port, network byte order.
    pub port: [u8; 2],
    /// IP protocol number.
    pub protocol: u8,
    /// Always 0.
    pub _pad: u8,
}

/// Value of both frontend maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendValue {
    /// [`frontend_kind`].
    pub kind: u32,
}

/// Key of [`maps::CONNTRACK`]: one entry per endpoint and connection,
/// oriented from the endpoint (`local`) to its peer, so that a connection's
/// packets in both directions find the same entry at the same endpoint.
/// Ports are in host byte order; for ICMP echo both hold the echo id.
/// IPv4 addresses fill the first 4 bytes of the 16, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Endpoint id.
    pub endpoint: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// [`family`] code.
    pub family: u8,
    /// Always 0.
    pub _pad: u16,
    /// The endpoint's port.
    pub local_port: u16,
    /// The peer's port.
    pub peer_port: u16,
    /// The endpoint's address.
    pub local_addr: [u8; 16],
    /// The peer's address.
    pub peer_addr: [u8; 16],
}

/// Value of [`maps::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// [`direction`] of the packet that opened the entry: `EGRESS` when the
    /// endpoint initiated the connection.
    pub origin: u32,
    /// The [`reason`] that admitted the first packet.
    pub admitted_by: u32,
    /// The endpoint's policy generation for `origin` when the connection
    /// was last judged; a different current generation makes the next
    /// packet re-check the connection (revocation).
    pub generation: u32,
    /// [`tcp_state`].
    pub tcp_state: u32,
}

/// Key of [`maps::FRAGMENTS`]: one datagram's fragments at one endpoint
/// and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// [`policy_selector`] of the endpoint and direction.
    pub selector: u32,
    /// [`family`] code.
    pub family: u8,
    /// IP protocol of the datagram.
    pub protocol: u8,
    /// Always 0.
    pub _pad: u16,
    /// IP identification (IPv4: 16 bits; IPv6 fragment header: 32 bits).
    pub id: u32,
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
}

/// Value of [`maps::FRAGMENTS`]: the first fragment's verdict, which the
/// later ones follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Non-zero when the first fragment was allowed.
    pub allowed: u32,
    /// End (bytes into the datagram's payload) of the furthest fragment
    /// seen; a fragment starting before it overlaps and is dropped.
    pub next_offset: u32,
    /// `bpf_ktime_get_ns` of the first fragment.
    pub first_seen_ns: u64,
}

/// `aya::Pod` lets the agent read and write these types in maps.
#[cfg(feature = "user")]
mod user {
    use super::{
        CtKey, CtValue, DenyEvent, EndpointCacheEntry, EndpointInfo, EventBucket, FragKey,
        FragValue, FrontendKeyV4, FrontendKeyV6, FrontendValue, GlobalConfig, PolicyKeyV4,
        PolicyKeyV6, PolicyValue, PortKey, PortValue, TrafficCounter,
    };

    // SAFETY: each type is #[repr(C)], Copy, has only integer fields and no
    // implicit padding (pinned by the layout tests), so every byte pattern
    // is a valid value.
    unsafe impl aya::Pod for TrafficCounter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointCacheEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GlobalConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FrontendKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FrontendKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FrontendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DenyEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn traffic_counter_layout_is_two_u64() {
        assert_eq!(size_of::<TrafficCounter>(), 16);
        assert_eq!(offset_of!(TrafficCounter, packets), 0);
        assert_eq!(offset_of!(TrafficCounter, bytes), 8);
    }

    #[test]
    fn endpoint_info_layout_is_id_flags_generations_then_addresses() {
        assert_eq!(size_of::<EndpointInfo>(), 40);
        assert_eq!(offset_of!(EndpointInfo, slot), 36);
        assert_eq!(offset_of!(EndpointInfo, id), 0);
        assert_eq!(offset_of!(EndpointInfo, flags), 4);
        assert_eq!(offset_of!(EndpointInfo, ingress_gen), 8);
        assert_eq!(offset_of!(EndpointInfo, egress_gen), 12);
        assert_eq!(offset_of!(EndpointInfo, ipv4), 16);
        assert_eq!(offset_of!(EndpointInfo, ipv6), 20);
    }

    #[test]
    fn endpoint_cache_entry_layout_is_epoch_then_info() {
        assert_eq!(size_of::<EndpointCacheEntry>(), 48);
        assert_eq!(offset_of!(EndpointCacheEntry, epoch), 0);
        assert_eq!(offset_of!(EndpointCacheEntry, info), 8);
    }

    #[test]
    fn consecutive_endpoint_epochs_differ_in_exactly_one_bit() {
        let mut e = 0;
        for n in 0..5000u64 {
            assert_eq!(endpoint_epoch::count(e), n);
            let next = endpoint_epoch::next(e);
            assert_eq!((e ^ next).count_ones(), 1, "{e:#x} -> {next:#x}");
            e = next;
        }
        // Also far along the sequence, and across the top bit.
        for n in [u64::MAX / 3, (1 << 63) - 1, u64::MAX - 1] {
            let e = endpoint_epoch::gray(n);
            assert_eq!(endpoint_epoch::count(e), n);
            assert_eq!((e ^ endpoint_epoch::next(e)).count_ones(), 1);
        }
    }

    #[test]
    fn policy_key_v4_layout_is_selector_then_address() {
        assert_eq!(size_of::<PolicyKeyV4>(), 8);
        assert_eq!(offset_of!(PolicyKeyV4, selector), 0);
        assert_eq!(offset_of!(PolicyKeyV4, addr), 4);
    }

    #[test]
    fn policy_key_v6_layout_is_selector_then_address() {
        assert_eq!(size_of::<PolicyKeyV6>(), 20);
        assert_eq!(offset_of!(PolicyKeyV6, selector), 0);
        assert_eq!(offset_of!(PolicyKeyV6, addr), 4);
    }

    #[test]
    fn policy_value_layout_is_one_u32() {
        assert_eq!(size_of::<PolicyValue>(), 4);
        assert_eq!(offset_of!(PolicyValue, ruleset), 0);
    }

    #[test]
    fn port_key_layout_puts_port_after_48_bits() {
        assert_eq!(size_of::<PortKey>(), 8);
        assert_eq!(offset_of!(PortKey, ruleset), 0);
        assert_eq!(offset_of!(PortKey, protocol), 4);
        assert_eq!(offset_of!(PortKey, _pad), 5);
        assert_eq!(offset_of!(PortKey, port), 6);
        assert_eq!(
            offset_of!(PortKey, port) * 8,
            PORT_KEY_PROTOCOL_BITS as usize
        );
    }

    #[test]
    fn port_value_layout_is_one_u32() {
        assert_eq!(size_of::<PortValue>(), 4);
        assert_eq!(offset_of!(PortValue, allow), 0);
    }

    #[test]
    fn ct_key_layout_is_endpoint_protocol_ports_addresses() {
        assert_eq!(size_of::<CtKey>(), 44);
        assert_eq!(offset_of!(CtKey, endpoint), 0);
        assert_eq!(offset_of!(CtKey, protocol), 4);
        assert_eq!(offset_of!(CtKey, family), 5);
        assert_eq!(offset_of!(CtKey, _pad), 6);
        assert_eq!(offset_of!(CtKey, local_port), 8);
        assert_eq!(offset_of!(CtKey, peer_port), 10);
        assert_eq!(offset_of!(CtKey, local_addr), 12);
        assert_eq!(offset_of!(CtKey, peer_addr), 28);
    }

    #[test]
    fn ct_value_layout_is_timestamp_origin_reason_generation_state() {
        assert_eq!(size_of::<CtValue>(), 24);
        assert_eq!(offset_of!(CtValue, last_seen_ns), 0);
        assert_eq!(offset_of!(CtValue, origin), 8);
        assert_eq!(offset_of!(CtValue, admitted_by), 12);
        assert_eq!(offset_of!(CtValue, generation), 16);
        assert_eq!(offset_of!(CtValue, tcp_state), 20);
    }

    #[test]
    fn frag_key_layout_is_selector_protocol_id_addresses() {
        assert_eq!(size_of::<FragKey>(), 44);
        assert_eq!(offset_of!(FragKey, selector), 0);
        assert_eq!(offset_of!(FragKey, family), 4);
        assert_eq!(offset_of!(FragKey, protocol), 5);
        assert_eq!(offset_of!(FragKey, _pad), 6);
        assert_eq!(offset_of!(FragKey, id), 8);
        assert_eq!(offset_of!(FragKey, src), 12);
        assert_eq!(offset_of!(FragKey, dst), 28);
    }

    #[test]
    fn frag_value_layout_is_verdict_offset_time() {
        assert_eq!(size_of::<FragValue>(), 16);
        assert_eq!(offset_of!(FragValue, allowed), 0);
        assert_eq!(offset_of!(FragValue, next_offset), 4);
        assert_eq!(offset_of!(FragValue, first_seen_ns), 8);
    }

    #[test]
    fn global_config_layout_is_flags_timeouts_then_mark() {
        assert_eq!(offset_of!(GlobalConfig, flags), 0);
        assert_eq!(offset_of!(GlobalConfig, clock_jiffy_ns), 4);
        assert_eq!(offset_of!(GlobalConfig, ct_tcp_syn_ns), 8);
        assert_eq!(offset_of!(GlobalConfig, ct_tcp_established_ns), 16);
        assert_eq!(offset_of!(GlobalConfig, ct_tcp_closing_ns), 24);
        assert_eq!(offset_of!(GlobalConfig, ct_udp_ns), 32);
        assert_eq!(offset_of!(GlobalConfig, ct_other_ns), 40);
        assert_eq!(offset_of!(GlobalConfig, mark_mask), 48);
        assert_eq!(offset_of!(GlobalConfig, mark_shift), 52);
        assert_eq!(offset_of!(GlobalConfig, event_rate), 56);
        assert_eq!(offset_of!(GlobalConfig, event_burst), 60);
        assert_eq!(offset_of!(GlobalConfig, clock_offset_ns), 64);
        assert_eq!(size_of::<GlobalConfig>(), 72);
    }

    #[test]
    fn event_bucket_layout_is_tokens_then_time() {
        assert_eq!(size_of::<EventBucket>(), 16);
        assert_eq!(offset_of!(EventBucket, tokens), 0);
        assert_eq!(offset_of!(EventBucket, last_ns), 8);
    }

    #[test]
    fn deny_event_layout_is_time_ids_codes_ports_addresses() {
        assert_eq!(size_of::<DenyEvent>(), 64);
        assert_eq!(core::mem::align_of::<DenyEvent>(), 8);
        assert_eq!(offset_of!(DenyEvent, timestamp_ns), 0);
        assert_eq!(offset_of!(DenyEvent, endpoint), 8);
        assert_eq!(offset_of!(DenyEvent, ifindex), 12);
        assert_eq!(offset_of!(DenyEvent, reason), 16);
        assert_eq!(offset_of!(DenyEvent, direction), 20);
        assert_eq!(offset_of!(DenyEvent, family), 21);
        assert_eq!(offset_of!(DenyEvent, protocol), 22);
        assert_eq!(offset_of!(DenyEvent, icmp_type), 23);
        assert_eq!(offset_of!(DenyEvent, sport), 24);
        assert_eq!(offset_of!(DenyEvent, dport), 26);
        assert_eq!(offset_of!(DenyEvent, src), 28);
        assert_eq!(offset_of!(DenyEvent, dst), 44);
        assert_eq!(offset_of!(DenyEvent, _pad), 60);
    }

    const S: u64 = 1_000_000_000;

    /// Events `take` lets through when asked every `step_ns` for `n` asks.
    fn taken(rate: u32, burst: u32, step_ns: u64, n: u64) -> u64 {
        let mut b = events::first(0, burst);
        let mut ok = 1;
        for i in 1..n {
            if events::take(&mut b, i * step_ns, rate, burst) {
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn a_flood_gets_the_burst_then_the_rate() {
        // 10 s of one packet per millisecond at 10/s, burst 50: the burst,
        // then 10 a second.
        let got = taken(10, 50, S / 1000, 10_000);
        assert!((50 + 99..=50 + 100).contains(&got), "{got}");
        // Burst 1: exactly the rate.
        let got = taken(5, 1, S / 1000, 10_000);
        assert!((50..=51).contains(&got), "{got}");
    }

    #[test]
    fn a_quiet_endpoint_regains_its_burst_and_no_more() {
        let mut b = events::first(0, 3);
        assert!(events::take(&mut b, 0, 1, 3));
        assert!(events::take(&mut b, 0, 1, 3));
        assert!(!events::take(&mut b, 0, 1, 3), "burst of 3 spent");
        // An hour later: three again, not 3600.
        let later = 3600 * S;
        for i in 0..3 {
            assert!(events::take(&mut b, later, 1, 3), "event {i}");
        }
        assert!(!events::take(&mut b, later, 1, 3));
        // A year later, at the highest rate: no overflow, still the burst.
        let much_later = later + 365 * 24 * 3600 * S;
        let mut n = 0;
        while events::take(&mut b, much_later, u32::MAX, 3) {
            n += 1;
            assert!(n <= 3);
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn zero_means_the_defaults_and_large_values_are_capped() {
        assert_eq!(events::rate(0), u64::from(events::DEFAULT_RATE));
        assert_eq!(events::burst(0), u64::from(events::DEFAULT_BURST));
        assert_eq!(events::rate(u32::MAX), u64::from(events::MAX_RATE));
        assert_eq!(events::burst(u32::MAX), u64::from(events::MAX_BURST));
        let got = taken(0, 0, S / 100, 1000);
        assert!((50 + 99..=50 + 100).contains(&got), "defaults: {got}");
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut b = events::first(10 * S, 1);
        assert!(!events::take(&mut b, 5 * S, 1, 1));
        assert!(events::take(&mut b, 6 * S, 1, 1));
    }

    #[test]
    fn frontend_keys_layout_is_address_port_protocol() {
        assert_eq!(size_of::<FrontendKeyV4>(), 8);
        assert_eq!(offset_of!(FrontendKeyV4, addr), 0);
        assert_eq!(offset_of!(FrontendKeyV4, port), 4);
        assert_eq!(offset_of!(FrontendKeyV4, protocol), 6);
        assert_eq!(offset_of!(FrontendKeyV4, _pad), 7);
        assert_eq!(size_of::<FrontendKeyV6>(), 20);
        assert_eq!(offset_of!(FrontendKeyV6, addr), 0);
        assert_eq!(offset_of!(FrontendKeyV6, port), 16);
        assert_eq!(offset_of!(FrontendKeyV6, protocol), 18);
        assert_eq!(offset_of!(FrontendKeyV6, _pad), 19);
        assert_eq!(size_of::<FrontendValue>(), 4);
        assert_eq!(offset_of!(FrontendValue, kind), 0);
    }

    #[test]
    fn default_mark_mask_is_clear_of_kube_proxy_kube_router_and_tailscale() {
        for taken in [0x4000, 0x8000, 0x1_0000, 0x2_0000, 0xff_0000] {
            assert_eq!(mark::DEFAULT_MASK & taken, 0, "{taken:#x}");
        }
        assert!(mark::valid(mark::DEFAULT_MASK));
        assert_eq!(mark::shift(mark::DEFAULT_MASK), 24);
        assert_eq!(mark::slots(mark::DEFAULT_MASK), 255);
    }

    #[test]
    fn mark_slot_round_trips_and_keeps_other_bits() {
        let m = mark::with_slot(0x4000 | 0xff00_0000, 0x0ff0_0000, 20, 7);
        assert_eq!(m, 0xf070_4000);
        assert_eq!(mark::slot_of(m, 0x0ff0_0000, 20), 7);
        assert_eq!(mark::with_slot(m, 0x0ff0_0000, 20, 0), 0xf000_4000);
        assert!(!mark::valid(0x0f0f_0000));
        assert!(!mark::valid(0));
        assert_eq!(mark::slots(0xffff_0000), mark::MAX_SLOTS);
    }

    #[test]
    fn counter_indices_are_distinct_and_in_range() {
        let mut seen = [false; COUNTER_ENTRIES as usize];
        for d in 0..direction::COUNT {
            for f in 0..family::COUNT {
                for r in 0..reason::SLOTS {
                    let i = counter_index(d, f, r);
                    assert!(i < COUNTER_ENTRIES);
                    assert!(!seen[i as usize], "index {i} reused");
                    seen[i as usize] = true;
                }
            }
        }
    }

    #[test]
    fn counter_index_clamps_out_of_range_inputs() {
        assert!(counter_index(7, 9, 999) < COUNTER_ENTRIES);
    }

    #[test]
    fn drop_reasons_start_at_first_drop() {
        assert!(!reason::is_drop(reason::PASS_NON_IP));
        assert!(reason::is_drop(reason::DROP_POLICY));
        assert_eq!(reason::name(reason::DROP_PARSE), "drop_parse");
    }

    #[test]
    fn selector_keeps_direction_in_low_bit() {
        assert_eq!(policy_selector(5, direction::INGRESS), 11);
        assert_eq!(policy_selector(5, direction::EGRESS), 10);
    }
}
