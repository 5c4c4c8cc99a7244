//! What every program does with a packet, top to bottom: parse →
//! endpoint → conntrack → policy → verdict. `main.rs` holds the entry
//! points; each step's logic lives in its own module.
//!
//! The steps after parsing (fragments, conntrack, policy) run as one
//! global BPF function, [`netpol_steps`], which the verifier checks once
//! per program with nothing known of the packet, rather than once more for
//! every distinct state the parser and the Service-source step leave (on
//! 6.1 the programs used up to 73% of the verifier's limit that way).
use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use netpol_common::{
    EndpointInfo, GlobalConfig, direction, endpoint_flags, family, protocol, reason, scratch,
};

use crate::{
    config, conntrack, ctx, endpoint, fragment,
    packet::{self, FRAG_FIRST, FRAG_LATER, Packet, ParseError},
    parse::{self, Parsed},
    policy, service,
    service::MarkBits,
    verdict::{self, Verdict},
};

/// `from_pod` and `to_pod`: the pod's packet in `dir`.
#[inline(always)]
pub fn pod(ctx: &TcContext, dir: u32) -> i32 {
    let Some(p) = packet::fresh(scratch::SLOT_TC) else {
        return TC_ACT_SHOT;
    };
    let parsed = parse::packet(ctx, p);
    let pkt = &*p;
    let v = decide(ctx, dir, parsed, pkt);
    verdict::to_tc_action(ctx, &v, pkt)
}

#[inline(always)]
pub fn leave(ctx: &TcContext, l3: bool) -> i32 {
    let bits = MarkBits::current();
    let slot = service::marked_slot(ctx, bits);
    if slot == 0 {
        return TC_ACT_OK;
    }
    service::clear(ctx, bits);
    let Some(p) = packet::fresh(scratch::SLOT_TC) else {
        return TC_ACT_SHOT;
    };
    let parsed = if l3 {
        parse::packet_l3(ctx, p)
    } else {
        parse::packet(ctx, p)
    };
    let pkt = &*p;
    let source = service::source(slot);
    let id = match &source {
        Some((_, src)) => src.id,
        None => 0,
    };
    let r = match (parsed, &source) {
        // A marked packet is always IP; one that does not parse as such
        // is not passed unjudged.
        (Parsed::NonIp, _) => reason::DROP_PARSE,
        (_, None) => reason::DROP_MARK_STALE,
        (_, Some((_, src))) => steps(ctx, src, direction::EGRESS, parsed, scratch::SLOT_TC),
    };
    let mut v = Verdict::new(direction::EGRESS, pkt.family, r, id);
    if let Some((_, src)) = &source {
        v = v.staged_for(src);
    }
    verdict::to_tc_action(ctx, &v, pkt)
}

/// The verdict at the node's own sockets (`to_host`, a cgroup-skb hook:
/// 1 passes, 0 drops) on a Service packet whose backend is a node address.
#[inline(always)]
pub fn host(ctx: &TcContext) -> i32 {
    let bits = MarkBits::current();
    let slot = service::marked_slot(ctx, bits);
    if slot == 0 {
        return 1;
    }
    let Some(p) = packet::fresh(scratch::SLOT_HOST) else {
        return 0;
    };
    let parsed = parse::packet_l3(ctx, p);
    let pkt = &*p;
    // Programs of every agent on the host run at the root cgroup: judge
    // only packets that one of this agent's pods sent from its interface.
    let Some((ifindex, src)) = service::source(slot) else {
        return 1;
    };
    if ctx::ingress_ifindex(ctx) != ifindex || !endpoint::sent_by(&src, pkt) {
        return 1;
    }
    let r = match parsed {
        Parsed::NonIp => reason::DROP_PARSE,
        _ => steps(ctx, &src, direction::EGRESS, parsed, scratch::SLOT_HOST),
    };
    let v = Verdict::new(direction::EGRESS, pkt.family, r, src.id).staged_for(&src);
    i32::from(verdict::to_tc_action(ctx, &v, pkt) == TC_ACT_OK)
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
    !ep.programmed() || ep.isolated(dir)
}

/// The verdict on the pod's packet `pkt` (parsed into the TC slot).
#[inline(always)]
fn decide(ctx: &TcContext, dir: u32, parsed: Parsed, pkt: &Packet) -> Verdict {
    if let Parsed::NonIp = parsed {
        return Verdict::new(dir, family::OTHER, reason::PASS_NON_IP, 0);
    }
    let Some(ep) = endpoint::lookup(ctx) else {
        return Verdict::new(dir, pkt.family, reason::PASS_UNMANAGED, 0);
    };
    let fam = pkt.family;
    if dir == direction::INGRESS {
        // A Service packet: its source's egress first, with the backend
        // kube-proxy chose as the peer.
        let bits = MarkBits::current();
        let slot = service::marked_slot(ctx, bits);
        if slot != 0 {
            service::clear(ctx, bits);
            match service::source(slot) {
                None => {
                    return Verdict::new(direction::EGRESS, fam, reason::DROP_MARK_STALE, 0);
                }
                Some((ifindex, _)) if ifindex == ctx::ifindex(ctx) => {
                    return Verdict::new(dir, fam, hairpin(ctx, &ep, pkt), ep.id);
                }
                Some((_, src)) => {
                    let r = steps(ctx, &src, direction::EGRESS, parsed, scratch::SLOT_TC);
                    let v = Verdict::new(direction::EGRESS, fam, r, src.id).staged_for(&src);
                    if reason::is_drop(v.reason) {
                        return v;
                    }
                    // The source's egress passed: its staged report now,
                    // the ingress's verdict below.
                    verdict::report_staged(ctx, &v, pkt);
                }
            }
        }
    }
    if dir == direction::EGRESS
        && ep.programmed()
        && !matches!(parsed, Parsed::Bad(_))
        && endpoint::spoofed(&ep, pkt)
    {
        return Verdict::new(dir, fam, reason::DROP_SPOOFED, ep.id);
    }
    let r = steps(ctx, &ep, dir, parsed, scratch::SLOT_TC);
    Verdict::new(dir, fam, r, ep.id).staged_for(&ep)
}

/// The endpoint's verdict on the IP packet in scratch `slot`, in `dir`:
/// [`netpol_steps`], its arguments packed.
#[inline(always)]
fn steps(ctx: &TcContext, ep: &EndpointInfo, dir: u32, parsed: Parsed, slot: u32) -> u32 {
    netpol_steps(
        ctx.skb.skb,
        u64::from(ep.id) | u64::from(ep.flags) << 32,
        u64::from(ep.ingress_gen) | u64::from(ep.egress_gen) << 32,
        u64::from(ep.slot)
            | u64::from(dir as u8) << 32
            | u64::from(parsed.code()) << 40
            | u64::from(slot as u8) << 48,
    )
}

/// The steps after parsing, verified once per program: the endpoint's id
/// and flags, its generations, then its mark slot, the direction, the
/// parse outcome ([`Parsed::code`]) and the scratch slot holding the
/// packet, packed by [`steps`] (kernels before 5.12 give a global
/// function scalars only; the addresses it does not need). Returns a
/// step's result (a reason, perhaps with [`verdict::JUDGED`]).
/// `no_mangle` and `extern "C"`, as `events::netpol_deny_event`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn netpol_steps(
    skb: *mut __sk_buff,
    id_flags: u64,
    generations: u64,
    rest: u64,
) -> u32 {
    let ctx = TcContext::new(skb);
    let ep = EndpointInfo {
        id: id_flags as u32,
        flags: (id_flags >> 32) as u32,
        ingress_gen: generations as u32,
        egress_gen: (generations >> 32) as u32,
        ipv4: [0; 4],
        ipv6: [0; 16],
        slot: rest as u32,
    };
    // One constant direction per path: the checks below then agree with
    // each other, where an unknown one would have the verifier follow
    // every mix of them.
    let dir = if (rest >> 32) as u8 == direction::INGRESS as u8 {
        direction::INGRESS
    } else {
        direction::EGRESS
    };
    let parsed = Parsed::from_code((rest >> 40) as u8);
    let Some(pkt) = packet::parsed(u32::from((rest >> 48) as u8)) else {
        return fallback(&ep, dir);
    };
    ip_steps(&ctx, &ep, dir, parsed, pkt)
}

/// The endpoint's verdict on an IP packet in `dir`: parse failures,
/// neighbour discovery, fragments, then conntrack and policy.
#[inline(always)]
fn ip_steps(ctx: &TcContext, ep: &EndpointInfo, dir: u32, parsed: Parsed, pkt: &Packet) -> u32 {
    if let Parsed::Bad(e) = parsed {
        // Every parse failure fails closed where policy applies.
        if !enforced(ep, dir) {
            return reason::PASS_NOT_ISOLATED;
        }
        return match e {
            ParseError::FragmentShort => reason::DROP_FRAGMENT_SHORT,
            ParseError::Truncated | ParseError::Malformed => reason::DROP_PARSE,
        };
    }
    if icmpv6_control(pkt) {
        return reason::PASS_ICMPV6_CONTROL;
    }
    if pkt.frag == FRAG_LATER {
        return later_fragment(ctx, ep, dir, pkt);
    }
    let r = judge(ctx, ep, dir, pkt);
    if pkt.frag == FRAG_FIRST && enforced(ep, dir) {
        let key = fragment::key(ep.id, dir, pkt);
        if !fragment::record(&key, pkt, !reason::is_drop(verdict::reason_of(r))) {
            return reason::DROP_FRAGMENT_OVERLAP;
        }
    }
    r
}

/// A pod reaching itself through its own Service (kube-proxy masquerades
/// the source to a node address): not subject to its `NetworkPolicies`;
/// when a `ClusterNetworkPolicy` applies to it (`HAIRPIN_JUDGED`), its
/// egress and then its ingress are judged with its own address (the
/// translated destination) as the peer, every packet, as Service traffic
/// is. Tracked so that its replies to the masqueraded address pass its
/// `from_pod`.
#[inline(always)]
fn hairpin(ctx: &TcContext, ep: &EndpointInfo, pkt: &Packet) -> u32 {
    if ep.flags & (endpoint_flags::HAIRPIN_JUDGED | endpoint_flags::STAGED_HAIRPIN) != 0 {
        let flags_family = u64::from(ep.flags) | u64::from(pkt.family) << 32;
        let r = policy::netpol_hairpin_allows(ctx.skb.skb, ep.id, flags_family, pkt.event);
        // What the staged view would do with a new hairpin, reported
        // (never acted on).
        verdict::report_hairpin(ctx, ep.id, r, pkt);
        if r & 1 == 0 {
            return reason::DROP_POLICY;
        }
    }
    let key = conntrack::key(ep.id, direction::INGRESS, pkt);
    conntrack::track(
        &key,
        direction::INGRESS,
        reason::PASS_HAIRPIN,
        ep.ingress_gen,
        pkt.tcp_flags,
    );
    reason::PASS_HAIRPIN
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
/// to have). Inlined into [`netpol_steps`], whose own call already frees
/// the parser's stack (and the packet is not on the stack).
#[inline(always)]
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
    // Read in place: a copy takes stack `to_pod`'s deepest chain lacks.
    let Some(cfg) = config::get() else {
        return fallback(ep, dir);
    };
    let ct = conntrack::lookup(&key, cfg, pkt.tcp_flags);
    // A new connection the policy judges is marked (a constant bit: the
    // verifier still tells the paths apart) for the staged view's
    // judgement, which the programs make where the verdict is made (see
    // `Verdict::staged_for`).
    let mut judged = 0;
    // Service traffic is judged after translation (see `service`), every
    // packet: the frontend says nothing about the backend it will reach.
    // The entry recorded here is the one the replies, translated back to
    // the frontend, find at this pod's `to_pod`. A reply to a connection
    // the peer opened goes back to the peer's own address, never through
    // a frontend, so it skips the frontend map (a cache miss per
    // connection, on the destination's random port).
    let service_flow = ct.found() && ct.admitted_by() == reason::PASS_SERVICE;
    let service = dir == direction::EGRESS
        && service::wanted(ep, cfg)
        && !(ct.found() && ct.origin() == direction::INGRESS)
        && (service_flow || service::is_frontend(pkt));
    let r = if service {
        service::mark(ctx, MarkBits::of(cfg), ep.slot);
        // The lookup refreshed the entry of a known Service flow; a new
        // one (or a flow first seen before its address was a frontend) is
        // recorded below, as Service traffic.
        if service_flow {
            return reason::PASS_SERVICE;
        }
        reason::PASS_SERVICE
    } else {
        if ct.found() {
            return revalidate(ep, &key, ct.origin(), ct.admitted_by(), ct.generation());
        }
        if let Some(r) = untracked(ep, dir, pkt, cfg) {
            return r;
        }
        judged = verdict::JUDGED;
        if !ep.isolated(dir) {
            reason::PASS_NOT_ISOLATED
        } else {
            let peer = if dir == direction::EGRESS {
                &pkt.dst
            } else {
                &pkt.src
            };
            if !policy::allows(ep.id, dir, pkt.family, pkt.protocol, pkt.dport, peer) {
                return reason::DROP_POLICY | verdict::JUDGED;
            }
            reason::PASS_POLICY
        }
    };
    conntrack::track(&key, dir, r, endpoint::generation(ep, dir), pkt.tcp_flags);
    r | judged
}

/// An array's entries always exist, so the settings are always found; the
/// verifier still wants a path for their absence. Policy applies as
/// without settings (fail closed where the endpoint is isolated).
#[inline(always)]
const fn fallback(ep: &EndpointInfo, dir: u32) -> u32 {
    if ep.isolated(dir) {
        reason::DROP_NOT_PROGRAMMED
    } else {
        reason::PASS_NOT_ISOLATED
    }
}

/// The verdict on a packet conntrack does not know that comes before
/// policy: an ICMP error about a tracked connection, and a pod the agent
/// has not programmed yet.
#[inline(always)]
fn untracked(ep: &EndpointInfo, dir: u32, pkt: &Packet, cfg: &GlobalConfig) -> Option<u32> {
    if pkt.inner.valid != 0 {
        let related = conntrack::inner_key(ep.id, dir, pkt.family, &pkt.inner);
        if conntrack::exists(&related, cfg) {
            return Some(reason::PASS_RELATED);
        }
    }
    if !ep.programmed() {
        if config::new_pods_fail_open(cfg) {
            return Some(reason::PASS_NEW_POD_OPEN);
        }
        return Some(reason::DROP_NOT_PROGRAMMED);
    }
    None
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
    // Node traffic, Service frontends (whose forward packets are judged
    // after translation, every one) and a pod's own traffic are not
    // re-judged here.
    if generation == current
        || matches!(
            admitted_by,
            reason::PASS_NODE_ORIGIN | reason::PASS_SERVICE | reason::PASS_HAIRPIN
        )
    {
        return reason::PASS_TRACKED;
    }
    let allowed = !ep.isolated(origin) || {
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
