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
mod fragment;
mod maps;
mod parse;
mod policy;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netpol_common::{EndpointInfo, config_flags, direction, family, protocol, reason};

use crate::{
    parse::{FRAG_FIRST, FRAG_LATER, Packet, ParseError, Parsed},
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

/// Whether policy (or the new-pods mode) applies to this direction.
#[inline(always)]
const fn enforced(ep: &EndpointInfo, dir: u32) -> bool {
    !endpoint::programmed(ep) || endpoint::isolated(ep, dir)
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
    let fam = pkt.family;
    if let Parsed::Bad(e) = parsed {
        // Every parse failure fails closed where policy applies.
        let r = if !enforced(&ep, dir) {
            reason::PASS_NOT_ISOLATED
        } else {
            match e {
                ParseError::FragmentShort => reason::DROP_FRAGMENT_SHORT,
                ParseError::Truncated | ParseError::Malformed => reason::DROP_PARSE,
            }
        };
        return Verdict::new(fam, r);
    }
    if dir == direction::EGRESS && endpoint::programmed(&ep) && endpoint::spoofed(&ep, &pkt) {
        return Verdict::new(fam, reason::DROP_SPOOFED);
    }
    if icmpv6_control(&pkt) {
        return Verdict::new(fam, reason::PASS_ICMPV6_CONTROL);
    }
    if pkt.frag == FRAG_LATER {
        return Verdict::new(fam, later_fragment(ctx, &ep, dir, &pkt));
    }
    let r = judge(ctx, &ep, dir, &pkt);
    if pkt.frag == FRAG_FIRST && enforced(&ep, dir) {
        let key = fragment::key(ep.id, dir, &pkt);
        if !fragment::record(&key, &pkt, !reason::is_drop(r)) {
            return Verdict::new(fam, reason::DROP_FRAGMENT_OVERLAP);
        }
    }
    Verdict::new(fam, r)
}

/// A fragment without a transport header follows its first fragment.
#[inline(always)]
fn later_fragment(ctx: &TcContext, ep: &EndpointInfo, dir: u32, pkt: &Packet) -> u32 {
    if !enforced(ep, dir) {
        return reason::PASS_NOT_ISOLATED;
    }
    if dir == direction::INGRESS && endpoint::from_node(ctx) {
        return reason::PASS_NODE_ORIGIN;
    }
    fragment::follow(&fragment::key(ep.id, dir, pkt), pkt)
}

/// Conntrack, then policy, for a packet with a transport header (or none
/// to have). Not inlined, for the same stack reason as `parse::packet`.
#[inline(never)]
fn judge(ctx: &TcContext, ep: &EndpointInfo, dir: u32, pkt: &Packet) -> u32 {
    let key = conntrack::key(ep.id, dir, pkt);
    // Tracked so that the pod's replies pass an isolated egress.
    if dir == direction::INGRESS && endpoint::from_node(ctx) {
        let generation = endpoint::generation(ep, dir);
        conntrack::track(
            &key,
            dir,
            reason::PASS_NODE_ORIGIN,
            generation,
            pkt.tcp_flags,
        );
        return reason::PASS_NODE_ORIGIN;
    }
    let cfg = endpoint::config();
    if let Some(ct) = conntrack::lookup(&key, &cfg, pkt.tcp_flags) {
        return revalidate(ep, &key, ct.origin, ct.admitted_by, ct.generation);
    }
    if pkt.inner.valid != 0 {
        let related = conntrack::inner_key(ep.id, dir, pkt.family, &pkt.inner);
        if conntrack::exists(&related, &cfg) {
            return reason::PASS_RELATED;
        }
    }
    if !endpoint::programmed(ep) {
        if cfg.flags & config_flags::NEW_PODS_FAIL_OPEN != 0 {
            return reason::PASS_NEW_POD_OPEN;
        }
        return reason::DROP_NOT_PROGRAMMED;
    }
    let r = if !endpoint::isolated(ep, dir) {
        reason::PASS_NOT_ISOLATED
    } else {
        let peer = if dir == direction::EGRESS {
            &pkt.dst
        } else {
            &pkt.src
        };
        if !policy::allows(ep.id, dir, pkt.family, pkt.protocol, pkt.dport, peer) {
            return reason::DROP_POLICY;
        }
        reason::PASS_POLICY
    };
    conntrack::track(&key, dir, r, endpoint::generation(ep, dir), pkt.tcp_flags);
    r
}

/// A tracked connection passes while the policy that admitted it is
/// unchanged. When the endpoint's generation for the connection's
/// original direction has moved, the connection is judged again as it was
/// opened (a reply is judged as the connection it belongs to), and cut if
/// the new policy no longer allows it.
#[inline(always)]
fn revalidate(
    ep: &EndpointInfo,
    key: &netpol_common::CtKey,
    origin: u32,
    admitted_by: u32,
    generation: u32,
) -> u32 {
    let current = endpoint::generation(ep, origin);
    if generation == current || admitted_by == reason::PASS_NODE_ORIGIN {
        return reason::PASS_TRACKED;
    }
    let allowed = !endpoint::isolated(ep, origin) || {
        let dport = if origin == direction::EGRESS {
            key.peer_port
        } else {
            key.local_port
        };
        policy::allows(
            ep.id,
            origin,
            u32::from(key.family),
            key.protocol,
            dport,
            &key.peer_addr,
        )
    };
    if allowed {
        conntrack::set_generation(key, current);
        reason::PASS_TRACKED
    } else {
        conntrack::remove(key);
        reason::DROP_REVOKED
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
