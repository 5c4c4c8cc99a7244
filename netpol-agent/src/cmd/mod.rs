//! Subcommands of the `netpol-agent` binary that need more than a few lines.
pub mod compile;
pub mod diff;
pub mod explain;
pub mod inspect;
