//! The datapath's errors, each naming the operation and its object.

use std::path::PathBuf;

use aya::programs::tc::TcError;
use netpol_common::mark;

use crate::{bpffs, object};

/// Errors of the datapath, each naming the operation and its object.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    ObjectNotFound(#[from] object::ObjectNotFound),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("creating pin folder {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading eBPF object {path}: {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    /// The netlink path's clsact qdisc, which the programs need before
    /// they can attach (a missing interface fails here).
    #[error("attaching {programs} to {interface}: adding its clsact qdisc: {source}")]
    Clsact {
        /// The programs, joined with "and".
        programs: String,
        interface: String,
        source: Box<TcError>,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{interface} is not attached by this agent")]
    NotAttached { interface: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("TCX attach needs kernel 6.6 or later (this is {0})")]
    TcxUnsupported(String),
    #[error("link of {program} on {interface}: {source}")]
    Link {
        program: &'static str,
        interface: String,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning a link at {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
    #[error("removing {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listing interfaces: {source}")]
    Interfaces { source: std::io::Error },
    #[error("deleting the clsact qdisc of {interface}: {message}")]
    QdiscDelete { interface: String, message: String },
    #[error(
        "mark mask {mask:#010x} is not usable: it must be one run of contiguous bits (e.g. {:#010x}), not 0",
        mark::DEFAULT_MASK
    )]
    MarkMask { mask: u32 },
    #[error(
        "no cgroup v2 hierarchy at or under {path} ({source}): Service backends on node \
         addresses cannot be judged"
    )]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{interface} is attached as a pod interface, not as an uplink")]
    PodInterface { interface: String },
    #[error("reading the link type of {interface}: {source}")]
    LinkType {
        interface: String,
        source: std::io::Error,
    },
}
