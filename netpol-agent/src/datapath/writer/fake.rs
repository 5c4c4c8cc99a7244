//! The in-memory backend, with a capacity per map to simulate full maps.

use std::collections::BTreeMap;

use super::{Backend, BackendError, KernelOp, Mirror};

/// In-memory maps with a capacity each, for tests without a kernel.
#[derive(Clone, Debug, Default)]
pub struct FakeBackend {
    /// The maps' contents.
    pub state: Mirror,
    /// Capacity per map name; absent: unlimited.
    pub capacity: BTreeMap<&'static str, usize>,
    /// Operations executed, in order (rollbacks included).
    pub log: Vec<KernelOp>,
    /// Endpoint ids whose connections were purged.
    pub purged: Vec<u32>,
    /// Peer addresses whose connections were purged.
    pub purged_peers: Vec<std::net::IpAddr>,
}

impl Backend for FakeBackend {
    fn exec(&mut self, op: &KernelOp) -> Result<(), BackendError> {
        let map = op.map();
        let is_upsert = matches!(
            op,
            KernelOp::EndpointUpsert(..)
                | KernelOp::PolicyV4Upsert(..)
                | KernelOp::PolicyV6Upsert(..)
                | KernelOp::PortUpsert(..)
                | KernelOp::FrontendV4Upsert(..)
                | KernelOp::FrontendV6Upsert(..)
        ) || matches!(op, KernelOp::SlotSet(_, i) if *i != 0);
        // The inverse of an upsert is a delete exactly when the key is new.
        let grows = is_upsert
            && matches!(
                self.state.inverse(op),
                KernelOp::EndpointDelete(..)
                    | KernelOp::PolicyV4Delete(..)
                    | KernelOp::PolicyV6Delete(..)
                    | KernelOp::PortDelete(..)
                    | KernelOp::FrontendV4Delete(..)
                    | KernelOp::FrontendV6Delete(..)
                    | KernelOp::SlotClear(..)
            );
        if grows
            && let Some(&cap) = self.capacity.get(map)
            && self.state.entries(map) >= cap
        {
            return Err(BackendError {
                errno: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.log.push(*op);
        self.state.apply_op(op);
        Ok(())
    }

    fn purge_connections(&mut self, endpoint: u32) -> Result<usize, BackendError> {
        self.purged.push(endpoint);
        Ok(0)
    }

    fn purge_peers(&mut self, peers: &[std::net::IpAddr]) -> Result<usize, BackendError> {
        self.purged_peers.extend_from_slice(peers);
        Ok(0)
    }
}
