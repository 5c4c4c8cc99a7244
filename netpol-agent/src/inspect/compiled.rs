//! [`CompiledMaps`]: a compiled state read as [`Maps`], the way the map
//! writer would fill the kernel's maps with it. `diff` judges the
//! manifests' outcome with it; tests stand it in for the live maps.
use std::{collections::BTreeMap, net::IpAddr};

use netpol_common::{FrontendValue, GlobalConfig};

use super::{
    InspectError, LiveEndpoint, LiveEntry, Maps, PortBlock, decode_policy_v4, decode_policy_v6,
    decode_port,
};
use crate::{compiler::Compiled, model::ObjectRef};

/// The maps a [`Compiled`] state fills, in memory: lookups are the longest
/// prefix match over the entries, as the kernel's tries answer them.
#[derive(Clone, Debug)]
pub struct CompiledMaps {
    pub(crate) endpoints: Vec<LiveEndpoint>,
    v4: Vec<LiveEntry>,
    v6: Vec<LiveEntry>,
    ports: Vec<PortBlock>,
    frontends: BTreeMap<(IpAddr, u16, u8), FrontendValue>,
    pub(crate) config: GlobalConfig,
}

impl CompiledMaps {
    /// The maps of `c` with the pods of `ifindex` bound to those interfaces
    /// (the endpoint map holds bound pods only) and `config` as the config
    /// map's entry.
    #[must_use]
    pub fn new(c: &Compiled, ifindex: &BTreeMap<ObjectRef, u32>, config: GlobalConfig) -> Self {
        let mut frontends = BTreeMap::new();
        for (k, v) in &c.frontends_v4 {
            frontends.insert(
                (IpAddr::from(k.addr), u16::from_be_bytes(k.port), k.protocol),
                *v,
            );
        }
        for (k, v) in &c.frontends_v6 {
            frontends.insert(
                (IpAddr::from(k.addr), u16::from_be_bytes(k.port), k.protocol),
                *v,
            );
        }
        let mut endpoints: Vec<LiveEndpoint> = c
            .endpoint_infos()
            .filter_map(|(p, info)| ifindex.get(p).map(|&i| LiveEndpoint { ifindex: i, info }))
            .collect();
        endpoints.sort_by_key(|e| (e.info.id, e.ifindex));
        Self {
            endpoints,
            v4: c
                .policy_v4_entries()
                .map(|(l, k, v)| decode_policy_v4(l, &k, v))
                .collect(),
            v6: c
                .policy_v6_entries()
                .map(|(l, k, v)| decode_policy_v6(l, &k, v))
                .collect(),
            ports: c
                .port_entries()
                .map(|(l, k, v)| decode_port(l, &k, v))
                .collect(),
            frontends,
            config,
        }
    }
}

impl Maps for CompiledMaps {
    fn endpoints(&self) -> Result<Vec<LiveEndpoint>, InspectError> {
        Ok(self.endpoints.clone())
    }

    fn policy_entries(&self, v6: bool) -> Result<Vec<LiveEntry>, InspectError> {
        Ok(if v6 { self.v6.clone() } else { self.v4.clone() })
    }

    fn policy_lookup(&self, selector: u32, peer: IpAddr) -> Result<Option<u32>, InspectError> {
        let list = if peer.is_ipv6() { &self.v6 } else { &self.v4 };
        Ok(list
            .iter()
            .filter(|e| e.selector == selector && e.prefix.contains(&peer))
            .max_by_key(|e| e.prefix_len)
            .map(|e| e.ruleset))
    }

    fn port_blocks(&self) -> Result<Vec<PortBlock>, InspectError> {
        Ok(self.ports.clone())
    }

    fn port_allows(&self, ruleset: u32, proto: u8, port: u16) -> Result<bool, InspectError> {
        // The blocks are prefixes: the one covering the port with the
        // fewest ports is the longest match, a protocol's before "every
        // protocol".
        Ok(self
            .ports
            .iter()
            .filter(|b| {
                b.ruleset == ruleset
                    && b.protocol.is_none_or(|p| p == proto)
                    && (b.first..=b.last).contains(&port)
            })
            .min_by_key(|b| (b.protocol.is_none(), b.last - b.first))
            .is_some_and(|b| b.allow))
    }

    fn frontend(
        &self,
        address: IpAddr,
        port: u16,
        protocol: u8,
    ) -> Result<Option<FrontendValue>, InspectError> {
        Ok(self.frontends.get(&(address, port, protocol)).copied())
    }

    fn config(&self) -> Result<GlobalConfig, InspectError> {
        Ok(self.config)
    }
}
