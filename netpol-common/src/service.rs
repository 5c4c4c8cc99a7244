//! Service frontends: the addresses, ports and protocols kube-proxy
//! translates, whose traffic is judged after translation.
use core::mem::offset_of;

#[cfg(doc)]
use crate::maps;

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

const _: () = {
    assert!(size_of::<FrontendKeyV4>() == 8);
    assert!(align_of::<FrontendKeyV4>() == 1);
    assert!(offset_of!(FrontendKeyV4, addr) == 0);
    assert!(offset_of!(FrontendKeyV4, port) == 4);
    assert!(offset_of!(FrontendKeyV4, protocol) == 6);
    assert!(offset_of!(FrontendKeyV4, _pad) == 7);
};

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

const _: () = {
    assert!(size_of::<FrontendKeyV6>() == 20);
    assert!(align_of::<FrontendKeyV6>() == 1);
    assert!(offset_of!(FrontendKeyV6, addr) == 0);
    assert!(offset_of!(FrontendKeyV6, port) == 16);
    assert!(offset_of!(FrontendKeyV6, protocol) == 18);
    assert!(offset_of!(FrontendKeyV6, _pad) == 19);
};

/// Value of both frontend maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendValue {
    /// [`frontend_kind`].
    pub kind: u32,
}

const _: () = {
    assert!(size_of::<FrontendValue>() == 4);
    assert!(align_of::<FrontendValue>() == 4);
    assert!(offset_of!(FrontendValue, kind) == 0);
};
