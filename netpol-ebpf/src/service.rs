//! Service traffic. kube-proxy translates a Service frontend to a backend
//! only after `from_pod` has run, so `from_pod` cannot judge the pod's
//! egress to it. It marks the packet instead (`skb->mark` bits carrying
//! the source interface's slot), and the hook that sees the backend —
//! the backend's `to_pod`, or `leave_node` on the way off the node —
//! judges the source's egress there.
use aya_ebpf::programs::TcContext;
use netpol_common::{
    EndpointInfo, FrontendKeyV4, FrontendKeyV6, GlobalConfig, endpoint_flags, family, mark,
};

use crate::{
    config, ctx,
    maps::{NETPOL_ENDPOINTS, NETPOL_FRONTENDS_V4, NETPOL_FRONTENDS_V6, NETPOL_MARK_SOURCES},
    packet::Packet,
};

/// Whether the endpoint's Service traffic is marked: it has a slot and is
/// isolated in some direction, in the enforced view or the staged one
/// (egress: its egress is judged after translation, the staged view's
/// too; ingress only: a hairpin must be recognised as the pod reaching
/// itself, which kube-proxy's masquerade hides). A pod only the staged
/// view isolates is marked so that its staged judgement meets the
/// backend, not the frontend address; its enforced verdicts are the same
/// either way (not isolated: passed).
#[inline(always)]
pub const fn wanted(ep: &EndpointInfo, cfg: &GlobalConfig) -> bool {
    cfg.mark_mask != 0
        && ep.slot != 0
        && ep.flags & endpoint_flags::NOT_PROGRAMMED == 0
        && ep.flags
            & (endpoint_flags::INGRESS_ISOLATED
                | endpoint_flags::EGRESS_ISOLATED
                | endpoint_flags::STAGED_INGRESS_ISOLATED
                | endpoint_flags::STAGED_EGRESS_ISOLATED)
            != 0
}

/// Whether the packet's destination is a Service frontend kube-proxy will
/// translate (address, protocol and port all match).
#[inline(always)]
pub fn is_frontend(pkt: &Packet) -> bool {
    let port = pkt.dport.to_be_bytes();
    if pkt.family == family::IPV4 {
        let key = FrontendKeyV4 {
            addr: [pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]],
            port,
            protocol: pkt.protocol,
            _pad: 0,
        };
        NETPOL_FRONTENDS_V4.get_ptr(key).is_some()
    } else {
        let key = FrontendKeyV6 {
            addr: pkt.dst,
            port,
            protocol: pkt.protocol,
            _pad: 0,
        };
        NETPOL_FRONTENDS_V6.get_ptr(key).is_some()
    }
}

/// The bits of `skb->mark` netpol owns and their position: all the hooks
/// that only read or clear a mark need of the settings, with no mask (0)
/// when the settings are absent.
#[derive(Clone, Copy)]
pub struct MarkBits {
    pub mask: u32,
    pub shift: u32,
}

impl MarkBits {
    #[inline(always)]
    pub const fn of(cfg: &GlobalConfig) -> Self {
        Self {
            mask: cfg.mark_mask,
            shift: cfg.mark_shift,
        }
    }

    /// The agent's; none (0) until it writes its settings.
    #[inline(always)]
    pub fn current() -> Self {
        match config::get() {
            Some(c) => Self::of(c),
            None => Self { mask: 0, shift: 0 },
        }
    }
}

/// Marks the packet with the source interface's slot.
#[inline(always)]
pub fn mark(ctx: &TcContext, bits: MarkBits, slot: u32) {
    let m = mark::with_slot(ctx::mark(ctx), bits.mask, bits.shift, slot);
    ctx.set_mark(m);
}

/// The slot a packet was marked with (0: not marked).
#[inline(always)]
pub fn marked_slot(ctx: &TcContext, bits: MarkBits) -> u32 {
    if bits.mask == 0 {
        return 0;
    }
    mark::slot_of(ctx::mark(ctx), bits.mask, bits.shift)
}

/// Clears netpol's bits once the packet is judged, so no later hook judges
/// it again.
#[inline(always)]
pub fn clear(ctx: &TcContext, bits: MarkBits) {
    let m = ctx::mark(ctx);
    ctx.set_mark(m & !bits.mask);
}

/// The pod interface owning `slot` and its endpoint, if the slot is still
/// its (a slot freed and reused since the packet was marked names another
/// interface, whose endpoint carries another slot).
#[inline(always)]
pub fn source(slot: u32) -> Option<(u32, EndpointInfo)> {
    let ifindex = *NETPOL_MARK_SOURCES.get(slot)?;
    if ifindex == 0 {
        return None;
    }
    let p = NETPOL_ENDPOINTS.get_ptr(ifindex)?;
    // SAFETY: a successful lookup returns a pointer to an EndpointInfo
    // valid for this run; it is copied out at once.
    let ep = unsafe { *p };
    if ep.slot != slot {
        return None;
    }
    Some((ifindex, ep))
}
