//! netpol agent library: keeps one node's eBPF NetworkPolicy datapath in step
//! with the cluster.
//!
//! Data flows one way: sources → [`model`] → [`compiler`] → map writer →
//! kernel ([`datapath`]).
//!
//! ```no_run
//! use netpol_agent::{Datapath, DatapathConfig};
//!
//! let mut dp = Datapath::load(&DatapathConfig::default())?;
//! dp.attach("veth1234")?;
//! let counters = dp.counters()?;
//! # Ok::<(), netpol_agent::DatapathError>(())
//! ```

pub mod bpffs;
pub mod compiler;
pub mod datapath;
pub mod model;
pub mod object;
pub mod privileges;

pub use datapath::{
    AttachMode, Counters, Datapath, DatapathConfig, DatapathError, MapSizes,
    writer::{FakeMapWriter, KernelMapWriter, MapWriteError, MapWriter},
};
