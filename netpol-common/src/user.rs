//! `aya::Pod` lets the agent read and write these types in maps (feature
//! `user`).
use crate::{
    CtKey, CtValue, DenyEvent, EndpointCacheEntry, EndpointInfo, EventBucket, FragKey, FragValue,
    FrontendKeyV4, FrontendKeyV6, FrontendValue, GlobalConfig, PolicyKeyV4, PolicyKeyV6,
    PolicyValue, PortKey, PortValue, TrafficCounter,
};

// SAFETY: each type is #[repr(C)], Copy, has only integer fields and no
// implicit padding (pinned by the const layout asserts beside each type),
// so every byte pattern is a valid value.
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
