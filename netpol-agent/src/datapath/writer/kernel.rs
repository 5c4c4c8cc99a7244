//! The kernel backend: single operations on the pinned BPF maps, and
//! reading them back.

use std::fmt;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use netpol_common::{
    CtKey, CtValue, EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyKeyV4,
    PolicyKeyV6, PolicyValue, PortKey, PortValue,
};

use super::{Backend, BackendError, KernelOp, Mirror};

/// The kernel's maps.
pub struct KernelBackend {
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    endpoint_epoch: Array<MapData, u64>,
    policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
    policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
    ports: LpmTrie<MapData, PortKey, PortValue>,
    services: ServiceMaps,
    conntrack: Option<BpfHashMap<MapData, CtKey, CtValue>>,
}

/// The maps of Service traffic: frontends and mark sources.
pub struct ServiceMaps {
    /// `NETPOL_FRONTENDS_V4`.
    pub frontends_v4: BpfHashMap<MapData, FrontendKeyV4, FrontendValue>,
    /// `NETPOL_FRONTENDS_V6`.
    pub frontends_v6: BpfHashMap<MapData, FrontendKeyV6, FrontendValue>,
    /// `NETPOL_MARK_SOURCES`.
    pub mark_sources: Array<MapData, u32>,
}

impl fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBackend").finish_non_exhaustive()
    }
}

impl KernelBackend {
    /// Wraps the four policy maps and the Service maps. Every endpoint
    /// write moves `endpoint_epoch` (`NETPOL_EP_EPOCH`), which retires the
    /// programs' cached copies of the endpoint table.
    #[must_use]
    pub fn new(
        endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
        endpoint_epoch: Array<MapData, u64>,
        policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
        policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
        ports: LpmTrie<MapData, PortKey, PortValue>,
        services: ServiceMaps,
    ) -> Self {
        Self {
            endpoints,
            endpoint_epoch,
            policy_v4,
            policy_v6,
            ports,
            services,
            conntrack: None,
        }
    }

    /// Retires the programs' cached endpoint entries: the next packet on
    /// each interface reads the table. One bit flips (see
    /// `netpol_common::endpoint_epoch`), so a packet reading the word
    /// mid-update sees the old or the new epoch.
    fn advance_endpoint_epoch(&mut self) -> Result<(), BackendError> {
        let now = self.endpoint_epoch.get(&0, 0).map_err(errno)?;
        self.endpoint_epoch
            .set(0, netpol_common::endpoint_epoch::next(now), 0)
            .map_err(errno)
    }

    /// Adds the connection map, so that gone endpoints' connections are
    /// purged.
    #[must_use]
    pub fn with_conntrack(mut self, conntrack: BpfHashMap<MapData, CtKey, CtValue>) -> Self {
        self.conntrack = Some(conntrack);
        self
    }

    /// Reads what the maps hold (adoption after a restart, inspection).
    ///
    /// # Errors
    /// When a map cannot be iterated.
    pub fn read_back(&self) -> Result<Mirror, BackendError> {
        let mut m = Mirror::default();
        for kv in &self.endpoints {
            let (k, v) = kv.map_err(errno)?;
            m.endpoints.insert(k, v);
        }
        for kv in &self.policy_v4 {
            let (k, v) = kv.map_err(errno)?;
            m.policy_v4.insert((k.prefix_len(), k.data()), v);
        }
        for kv in &self.policy_v6 {
            let (k, v) = kv.map_err(errno)?;
            m.policy_v6.insert((k.prefix_len(), k.data()), v);
        }
        for kv in &self.ports {
            let (k, v) = kv.map_err(errno)?;
            m.ports.insert((k.prefix_len(), k.data()), v);
        }
        for kv in &self.services.frontends_v4 {
            let (k, v) = kv.map_err(errno)?;
            m.frontends_v4.insert(k, v);
        }
        for kv in &self.services.frontends_v6 {
            let (k, v) = kv.map_err(errno)?;
            m.frontends_v6.insert(k, v);
        }
        // Slot 0 is never handed out; past MAX_SLOTS is not netpol's.
        let last = self
            .services
            .mark_sources
            .len()
            .min(netpol_common::mark::MAX_SLOTS + 1);
        for slot in 1..last {
            let ifindex = self.services.mark_sources.get(&slot, 0).map_err(errno)?;
            if ifindex != 0 {
                m.slots.insert(slot, ifindex);
            }
        }
        Ok(m)
    }
}

fn errno(e: aya::maps::MapError) -> BackendError {
    let io = match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    };
    BackendError { errno: io }
}

/// Deleting an absent key is not an error: the goal state holds.
fn tolerate_absent(r: Result<(), aya::maps::MapError>) -> Result<(), BackendError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.map_err(errno),
    }
}

impl Backend for KernelBackend {
    fn exec(&mut self, op: &KernelOp) -> Result<(), BackendError> {
        match *op {
            // A failed write changed nothing; a failed advance fails the
            // write, which the writer then rolls back.
            KernelOp::EndpointUpsert(i, v) => {
                self.endpoints.insert(i, v, 0).map_err(errno)?;
                self.advance_endpoint_epoch()
            }
            KernelOp::EndpointDelete(i) => {
                tolerate_absent(self.endpoints.remove(&i))?;
                self.advance_endpoint_epoch()
            }
            KernelOp::PolicyV4Upsert(l, k, v) => {
                self.policy_v4.insert(&Key::new(l, k), v, 0).map_err(errno)
            }
            KernelOp::PolicyV4Delete(l, k) => {
                tolerate_absent(self.policy_v4.remove(&Key::new(l, k)))
            }
            KernelOp::PolicyV6Upsert(l, k, v) => {
                self.policy_v6.insert(&Key::new(l, k), v, 0).map_err(errno)
            }
            KernelOp::PolicyV6Delete(l, k) => {
                tolerate_absent(self.policy_v6.remove(&Key::new(l, k)))
            }
            KernelOp::PortUpsert(l, k, v) => {
                self.ports.insert(&Key::new(l, k), v, 0).map_err(errno)
            }
            KernelOp::PortDelete(l, k) => tolerate_absent(self.ports.remove(&Key::new(l, k))),
            KernelOp::FrontendV4Upsert(k, v) => {
                self.services.frontends_v4.insert(k, v, 0).map_err(errno)
            }
            KernelOp::FrontendV4Delete(k) => tolerate_absent(self.services.frontends_v4.remove(&k)),
            KernelOp::FrontendV6Upsert(k, v) => {
                self.services.frontends_v6.insert(k, v, 0).map_err(errno)
            }
            KernelOp::FrontendV6Delete(k) => tolerate_absent(self.services.frontends_v6.remove(&k)),
            KernelOp::SlotSet(s, i) => self.services.mark_sources.set(s, i, 0).map_err(errno),
            KernelOp::SlotClear(s) => self.services.mark_sources.set(s, 0, 0).map_err(errno),
        }
    }

    fn purge_connections(&mut self, endpoint: u32) -> Result<usize, BackendError> {
        self.purge_where(|k| k.endpoint == endpoint)
    }

    fn purge_peers(&mut self, peers: &[std::net::IpAddr]) -> Result<usize, BackendError> {
        let keys: Vec<(u32, [u8; 16])> = peers
            .iter()
            .map(|ip| {
                let mut a = [0u8; 16];
                match ip {
                    std::net::IpAddr::V4(v4) => {
                        a[..4].copy_from_slice(&v4.octets());
                        (netpol_common::family::IPV4, a)
                    }
                    std::net::IpAddr::V6(v6) => (netpol_common::family::IPV6, v6.octets()),
                }
            })
            .collect();
        self.purge_where(|k| {
            keys.iter()
                .any(|(f, a)| u32::from(k.family) == *f && k.peer_addr == *a)
        })
    }
}

impl KernelBackend {
    fn purge_where(&mut self, forget: impl Fn(&CtKey) -> bool) -> Result<usize, BackendError> {
        let Some(ct) = self.conntrack.as_mut() else {
            return Ok(0);
        };
        // Collect first: deleting while iterating restarts the kernel's
        // key walk.
        let keys: Vec<CtKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| forget(k))
            .collect();
        for k in &keys {
            tolerate_absent(ct.remove(k))?;
        }
        Ok(keys.len())
    }
}
