//! The compiler without a kernel: its specification as tables, properties
//! over random clusters against the reference evaluator, the shared
//! conformance scenarios replayed, and `netpol-agent compile`.
mod cli;
mod conformance;
mod props;
mod table;
