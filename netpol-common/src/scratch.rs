//! The per-CPU space the programs keep the packet they are judging in
//! ([`maps::PACKET`]): the parser writes it, the steps a global BPF
//! function runs read it. Opaque to the agent, which never reads it.
#[cfg(doc)]
use crate::maps;

/// The slot of [`maps::PACKET`] the TC programs use.
pub const SLOT_TC: u32 = 0;
/// The slot the cgroup hook (`to_host`) uses: it may run in a context a
/// TC program on the same CPU interrupts, so they do not share one.
pub const SLOT_HOST: u32 = 1;
/// Slots in [`maps::PACKET`].
pub const SLOTS: u32 = 2;

/// One slot: room for the programs' parsed packet (their own type, which
/// asserts at build time that it fits).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct PacketScratch {
    pub bytes: [u8; 128],
}

const _: () = {
    assert!(size_of::<PacketScratch>() == 128);
    assert!(align_of::<PacketScratch>() == 8);
};
