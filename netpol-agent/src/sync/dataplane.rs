//! What the loop drives.

use crate::datapath::{
    Datapath, DatapathError,
    clock::JiffyClock,
    pins::RestoreError,
    writer::{Backend, MapWriter},
};

/// What the loop drives: the kernel's [`Datapath`], or a fake in tests.
pub(crate) trait Dataplane: crate::node::uplinks::UplinkHooks {
    /// Where the map writer writes.
    type Backend: Backend;
    /// The policy-map writer.
    fn writer(&mut self) -> &mut MapWriter<Self::Backend>;
    /// Attaches both programs to a pod interface, the quickest way that
    /// enforces ([`Datapath::attach_staged`]).
    fn attach(&mut self, interface: &str) -> Result<(), DatapathError>;
    /// Whether an interface waits on netlink filters for its TCX links.
    fn awaits_tcx(&self) -> bool {
        false
    }
    /// Whether `interface` does.
    fn interface_awaits_tcx(&self, _interface: &str) -> bool {
        false
    }
    /// Moves one such interface to TCX links.
    fn upgrade_to_tcx(&mut self) -> Result<Option<String>, DatapathError> {
        Ok(None)
    }
    /// Detaches them.
    fn detach(&mut self, interface: &str) -> Result<(), DatapathError>;
    /// The programs' clock in force.
    fn clock(&self) -> JiffyClock;
    /// Puts the programs on `clock`.
    fn set_clock(&mut self, clock: JiffyClock) -> Result<(), DatapathError>;
    /// Pins again what went missing.
    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>, RestoreError>;
    /// Where the maps are pinned.
    fn pin_dir(&self) -> &std::path::Path;
    /// The layout of the maps being replaced, if any.
    fn replacing_layout(&self) -> Option<u32>;
    /// Whether interfaces still wait for the new layout's programs.
    fn awaiting_interfaces(&self) -> bool;
    /// Swaps in the programs of the new layout.
    fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError>;
}

impl Dataplane for Datapath {
    type Backend = crate::datapath::writer::KernelBackend;
    fn writer(&mut self) -> &mut MapWriter<Self::Backend> {
        Datapath::writer(self)
    }
    fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        Datapath::attach_staged(self, interface)
    }
    fn awaits_tcx(&self) -> bool {
        Datapath::awaiting_tcx(self) > 0
    }
    fn interface_awaits_tcx(&self, interface: &str) -> bool {
        Datapath::awaits_tcx(self, interface)
    }
    fn upgrade_to_tcx(&mut self) -> Result<Option<String>, DatapathError> {
        Datapath::upgrade_to_tcx(self)
    }
    fn detach(&mut self, interface: &str) -> Result<(), DatapathError> {
        Datapath::detach(self, interface)
    }
    fn clock(&self) -> JiffyClock {
        Datapath::clock(self)
    }
    fn set_clock(&mut self, clock: JiffyClock) -> Result<(), DatapathError> {
        Datapath::set_clock(self, clock)
    }
    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>, RestoreError> {
        Datapath::restore_pins(self)
    }
    fn pin_dir(&self) -> &std::path::Path {
        Datapath::pin_dir(self)
    }
    fn replacing_layout(&self) -> Option<u32> {
        Datapath::replacing_layout(self)
    }
    fn awaiting_interfaces(&self) -> bool {
        Datapath::awaiting_interfaces(self)
    }
    fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError> {
        Datapath::commit_layout(self)
    }
}
