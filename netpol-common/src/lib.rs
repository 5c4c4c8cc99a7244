//! Map keys and values shared by the netpol TC programs and the agent.
//!
//! Every type here crosses the user/kernel boundary, so each is `#[repr(C)]`
//! with explicit padding, uses integer codes rather than Rust enums, and has
//! `const` assertions beside it pinning its size, alignment and field
//! offsets: they are checked wherever the crate compiles, the programs'
//! `bpfel-unknown-none` build included. The kernel side builds this crate
//! `no_std` without features; the agent enables `user` for the `aya::Pod`
//! impls.
//!
//! One file per feature. Everything is named from the crate root
//! (`netpol_common::EndpointInfo`, `netpol_common::reason::DROP_POLICY`):
//! the code tables and name lists are public modules, the files holding map
//! types are private and re-exported here.
// Library code returns its errors; a panic would be a bug (tests may
// unwrap what they set up).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(clippy::pedantic)]
// Pedantic lints that do not help this code:
#![allow(
    // `mark` and `mask` are the kernel's own words for the bits the programs share.
    clippy::similar_names,
    // Small helpers the BPF programs call: inlined there like every small eBPF helper.
    clippy::inline_always,
    // The explicit `_pad` fields are public so both sides can build the ABI structs.
    clippy::pub_underscore_fields,
)]
#![no_std]

// Names and code tables.
pub mod direction;
pub mod events;
pub mod family;
pub mod maps;
pub mod mark;
pub mod programs;
pub mod protocol;
pub mod reason;

// Map keys and values, by the feature that owns them.
mod config;
mod conntrack;
mod counters;
mod endpoint;
mod fragment;
mod policy;
pub mod scratch;
mod service;
#[cfg(feature = "user")]
mod user;

pub use config::{GlobalConfig, config_flags};
pub use conntrack::{CtKey, CtValue, ct_defaults, tcp_state};
pub use counters::{COUNTER_ENTRIES, TrafficCounter, counter_index};
pub use endpoint::{
    ENDPOINT_CACHE_SLOTS, EndpointCacheEntry, EndpointInfo, endpoint_epoch, endpoint_flags,
};
pub use events::{DenyEvent, EventBucket};
pub use fragment::{FragKey, FragValue};
pub use policy::{
    PORT_KEY_PROTOCOL_BITS, PolicyKeyV4, PolicyKeyV6, PolicyValue, PortKey, PortValue,
    SELECTOR_BITS, STAGED_ENDPOINT_BIT, policy_selector, staged_endpoint,
};
pub use scratch::PacketScratch;
pub use service::{FrontendKeyV4, FrontendKeyV6, FrontendValue, frontend_kind};

/// Version of the layout of every pinned map. Bumped whenever a key or value
/// type, a map's type or the counter index scheme changes, so that an agent
/// finding maps of another layout knows it cannot reuse them as they are.
pub const LAYOUT_VERSION: u32 = 5;
