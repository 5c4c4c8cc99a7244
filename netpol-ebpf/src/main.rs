//! netpol TC programs, attached to the host side of each pod's veth.
//!
//! `from_pod` runs at the host veth's TC ingress (packets the pod sends: the
//! pod's egress); `to_pod` runs at its TC egress (packets delivered to the
//! pod: the pod's ingress). Each reads like the packet: parse → (endpoint →
//! conntrack → policy, in later stages) → verdict.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netpol_common::{direction, family, reason};

use crate::{parse::L3, verdict::Verdict};

/// The pod's egress.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    verdict::to_tc_action(&ctx, direction::EGRESS, decide(&ctx))
}

/// The pod's ingress.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    verdict::to_tc_action(&ctx, direction::INGRESS, decide(&ctx))
}

/// Nothing is enforced yet: every packet passes, counted by family.
#[inline(always)]
fn decide(ctx: &TcContext) -> Verdict {
    match parse::l3(ctx) {
        Ok(L3::Ipv4) => Verdict::pass(family::IPV4, reason::PASS_UNMANAGED),
        Ok(L3::Ipv6) => Verdict::pass(family::IPV6, reason::PASS_UNMANAGED),
        Ok(L3::Other) => Verdict::pass(family::OTHER, reason::PASS_NON_IP),
        // Unparseable frames on an unmanaged interface are not ours to judge.
        Err(()) => Verdict::pass(family::OTHER, reason::PASS_UNMANAGED),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies the
    // no_std linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
