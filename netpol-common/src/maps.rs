//! Names of the maps in the eBPF object. The agent pins each under its bpffs
//! folder with the same file name.

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
/// Per-CPU array of [`crate::scratch::SLOTS`] [`crate::PacketScratch`]:
/// the packet each CPU's program is judging, written and read by the
/// programs only. Not pinned.
pub const PACKET: &str = "NETPOL_PACKET";
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
/// endpoint's event rate limit (and, keyed
/// [`crate::events::allowed_bucket`], its allowed-record one).
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
