//! netpol TC programs, attached to the host side of each pod's veth.
//!
//! `from_pod` runs at the host veth's TC ingress (packets the pod sends: the
//! pod's egress); `to_pod` runs at its TC egress (packets delivered to the
//! pod: the pod's ingress). Both read like the packet: parse → endpoint →
//! conntrack → policy → verdict.
#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod bench;
mod conntrack;
mod endpoint;
mod maps;
mod parse;
mod policy;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netpol_common::{config_flags, direction, family, protocol, reason};

use crate::{
    parse::{Packet, ParseError, Parsed},
    verdict::Verdict,
};

/// The pod's egress.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let v = decide(&ctx, direction::EGRESS);
    verdict::to_tc_action(&ctx, direction::EGRESS, &v)
}

/// The pod's ingress.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let v = decide(&ctx, direction::INGRESS);
    verdict::to_tc_action(&ctx, direction::INGRESS, &v)
}

/// Neighbour discovery, router messages and MLD: a pod without them loses
/// its neighbours, so no policy applies to them.
#[inline(always)]
const fn icmpv6_control(pkt: &Packet) -> bool {
    pkt.protocol == protocol::ICMPV6 && matches!(pkt.icmp_type, 130..=137 | 143)
}

#[inline(always)]
fn decide(ctx: &TcContext, dir: u32) -> Verdict {
    let mut pkt = Packet::default();
    let parsed = parse::packet(ctx, &mut pkt);
    if let Parsed::NonIp = parsed {
        return Verdict::new(family::OTHER, reason::PASS_NON_IP);
    }
    let Some(ep) = endpoint::lookup(ctx) else {
        return Verdict::new(pkt.family, reason::PASS_UNMANAGED);
    };
    match parsed {
        Parsed::NonIp | Parsed::Ip => {}
        // Every parse failure fails closed where policy (or the new-pods
        // mode) applies.
        Parsed::Bad(e) => {
            let r = if endpoint::programmed(&ep) && !endpoint::isolated(&ep, dir) {
                reason::PASS_NOT_ISOLATED
            } else {
                match e {
                    ParseError::ExtensionHeader => reason::DROP_IPV6_EXTENSION,
                    ParseError::Fragment => reason::DROP_FRAGMENT,
                    ParseError::Truncated | ParseError::Malformed => reason::DROP_PARSE,
                }
            };
            return Verdict::new(pkt.family, r);
        }
    }
    let fam = pkt.family;
    if icmpv6_control(&pkt) {
        return Verdict::new(fam, reason::PASS_ICMPV6_CONTROL);
    }

    let key = conntrack::key(ep.id, dir, &pkt);
    // Tracked so that the pod's replies pass an isolated egress.
    if dir == direction::INGRESS && endpoint::from_node(ctx) {
        conntrack::track(&key, dir, reason::PASS_NODE_ORIGIN);
        return Verdict::new(fam, reason::PASS_NODE_ORIGIN);
    }
    let cfg = endpoint::config();
    if conntrack::lookup(&key, &cfg) {
        return Verdict::new(fam, reason::PASS_TRACKED);
    }
    if !endpoint::programmed(&ep) {
        if cfg.flags & config_flags::NEW_PODS_FAIL_OPEN != 0 {
            return Verdict::new(fam, reason::PASS_NEW_POD_OPEN);
        }
        return Verdict::new(fam, reason::DROP_NOT_PROGRAMMED);
    }
    let r = if !endpoint::isolated(&ep, dir) {
        reason::PASS_NOT_ISOLATED
    } else {
        let peer = if dir == direction::EGRESS {
            &pkt.dst
        } else {
            &pkt.src
        };
        if policy::allows(ep.id, dir, &pkt, peer) {
            reason::PASS_POLICY
        } else {
            return Verdict::new(fam, reason::DROP_POLICY);
        }
    };
    conntrack::track(&key, dir, r);
    Verdict::new(fam, r)
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
