//! Policy direction, seen from the pod.

/// Traffic leaving the pod (`from_pod`, host veth TC ingress).
pub const EGRESS: u32 = 0;
/// Traffic entering the pod (`to_pod`, host veth TC egress).
pub const INGRESS: u32 = 1;
/// Number of directions.
pub const COUNT: u32 = 2;

/// The direction's name, as a policy's field (`egress`, `ingress`).
#[must_use]
pub const fn name(d: u32) -> &'static str {
    match d {
        EGRESS => "egress",
        INGRESS => "ingress",
        _ => "unknown",
    }
}
