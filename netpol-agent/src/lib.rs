//! netpol agent library: keeps one node's eBPF `NetworkPolicy` datapath in step
//! with the cluster.
//!
//! Data flows one way: [`sources`] → [`model`] → [`compiler`] → map writer →
//! kernel ([`datapath`]), driven by the one reconcile loop ([`sync`]) of an
//! [`Agent`].
//!
//! ```no_run
//! use netpol_agent::{Datapath, DatapathConfig};
//!
//! let mut dp = Datapath::load(&DatapathConfig::default())?;
//! dp.attach("veth1234")?;
//! let counters = dp.counters()?;
//! # Ok::<(), netpol_agent::DatapathError>(())
//! ```
// Library code returns its errors; a panic would be a bug (tests may
// unwrap what they set up).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(clippy::pedantic)]
// Pedantic lints that do not help this code:
#![allow(
    // The long functions are flat sequences (setup, one arm per kind); splitting hides the order.
    clippy::too_many_lines,
    // Types keep full names (`datapath::DatapathError`): the crate root re-exports them.
    clippy::module_name_repetitions,
    // Related short bindings (`pods`/`pols`) read clearly in their few lines.
    clippy::similar_names,
    // The explainer names rule, party, direction and query by their initials.
    clippy::many_single_char_names,
    // Fields mirror kernel structs (`bpf_attr`'s `query_flags`) and the words of their owner.
    clippy::struct_field_names,
)]

pub mod agent;
pub mod api;
pub mod bpffs;
pub mod compiler;
pub mod datapath;
pub mod events;
pub mod inspect;
pub mod model;
pub mod node;
pub mod object;
pub mod preflight;
pub mod privileges;
pub mod provenance;
pub mod resume;
mod shutdown;
pub mod sources;
pub mod staged;
pub mod status;
pub mod sync;
#[cfg(test)]
mod test_support;

pub use agent::{Agent, AgentBuilder, AgentError, ConnectionTimeouts, NewPods};
pub use sources::{Source, fingerprint};
pub use status::{Status, StatusHandle};

pub use datapath::{
    AttachMode, Counters, Datapath, DatapathConfig, DatapathError, MapSizes,
    writer::{FakeMapWriter, KernelMapWriter, MapWriteError, MapWriter},
};
