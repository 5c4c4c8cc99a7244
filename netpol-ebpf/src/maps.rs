//! The maps of the object. Key and value types live in `netpol-common`;
//! sizes here are defaults the agent may override at load time.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use netpol_common::{
    COUNTER_ENTRIES, CtKey, CtValue, DenyEvent, ENDPOINT_CACHE_SLOTS, EndpointCacheEntry,
    EndpointInfo, EventBucket, FragKey, FragValue, FrontendKeyV4, FrontendKeyV6, FrontendValue,
    GlobalConfig, PacketScratch, PolicyKeyV4, PolicyKeyV6, PolicyValue, PortKey, PortValue,
    TrafficCounter, events, mark,
};

/// Packets and bytes by direction, family and reason (`counter_index`).
#[btf_map]
pub static NETPOL_COUNTERS: PerCpuArray<TrafficCounter, { COUNTER_ENTRIES as usize }> =
    PerCpuArray::new();

/// Host-side interface index → the pod endpoint behind it.
#[btf_map]
pub static NETPOL_ENDPOINTS: HashMap<u32, EndpointInfo, 4096> = HashMap::new();

/// Moves after every agent write to `NETPOL_ENDPOINTS`
/// (`netpol_common::endpoint_epoch`).
#[btf_map]
pub static NETPOL_EP_EPOCH: Array<u64, 1> = Array::new();

/// Each CPU's copies of `NETPOL_ENDPOINTS` entries, by interface index.
#[btf_map]
pub static NETPOL_EP_CACHE: PerCpuArray<EndpointCacheEntry, { ENDPOINT_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// The packet each CPU's program is judging (`netpol_common::scratch`).
#[btf_map]
pub static NETPOL_PACKET: PerCpuArray<PacketScratch, { netpol_common::scratch::SLOTS as usize }> =
    PerCpuArray::new();

/// (endpoint·direction, IPv4 peer prefix) → rule set.
#[btf_map]
pub static NETPOL_POLICY_V4: LpmTrie<
    PolicyKeyV4,
    PolicyValue,
    262_144,
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// (endpoint·direction, IPv6 peer prefix) → rule set.
#[btf_map]
pub static NETPOL_POLICY_V6: LpmTrie<
    PolicyKeyV6,
    PolicyValue,
    262_144,
    { BPF_F_NO_PREALLOC as usize },
> = LpmTrie::new();

/// (rule set, protocol, port prefix) → allowed.
#[btf_map]
pub static NETPOL_PORTS: LpmTrie<PortKey, PortValue, 65_536, { BPF_F_NO_PREALLOC as usize }> =
    LpmTrie::new();

/// Connections each endpoint admitted.
#[btf_map]
pub static NETPOL_CONNTRACK: LruHashMap<CtKey, CtValue, 262_144> = LruHashMap::new();

/// The agent's settings (new-pods mode, timeouts).
#[btf_map]
pub static NETPOL_CONFIG: Array<GlobalConfig, 1> = Array::new();

/// First-fragment verdicts that later fragments follow.
#[btf_map]
pub static NETPOL_FRAGMENTS: LruHashMap<FragKey, FragValue, 8192> = LruHashMap::new();

/// IPv4 Service frontends (address, port, protocol) kube-proxy translates.
#[btf_map]
pub static NETPOL_FRONTENDS_V4: HashMap<FrontendKeyV4, FrontendValue, 65_536> = HashMap::new();

/// IPv6 Service frontends.
#[btf_map]
pub static NETPOL_FRONTENDS_V6: HashMap<FrontendKeyV6, FrontendValue, 65_536> = HashMap::new();

/// Mark slot → host ifindex of the pod interface owning it (0: free).
#[btf_map]
pub static NETPOL_MARK_SOURCES: Array<u32, { mark::MAX_SLOTS as usize + 1 }> = Array::new();

/// Deny events for the agent (`netpol_common::events`).
#[btf_map]
pub static NETPOL_EVENTS: RingBuf<DenyEvent, { events::RING_BYTES as usize }> = RingBuf::new();

/// Endpoint id → its deny-event token bucket (and
/// `events::allowed_bucket(id)` → its allowed-record one).
#[btf_map]
pub static NETPOL_EVENT_LIMITS: LruHashMap<u32, EventBucket, 8192> = LruHashMap::new();

/// Deny events not emitted, by cause (`events::LOST_*`).
#[btf_map]
pub static NETPOL_EVENTS_LOST: PerCpuArray<u64, { events::LOST_ENTRIES as usize }> =
    PerCpuArray::new();
