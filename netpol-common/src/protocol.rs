//! IP protocol numbers the datapath distinguishes.

/// ICMP.
pub const ICMP: u8 = 1;
/// TCP.
pub const TCP: u8 = 6;
/// UDP.
pub const UDP: u8 = 17;
/// `ICMPv6`.
pub const ICMPV6: u8 = 58;
/// SCTP.
pub const SCTP: u8 = 132;

/// The protocol's name as policies spell it (`TCP`, `ICMPv6`); `None`
/// for a number netpol gives no name.
#[must_use]
pub const fn name(p: u8) -> Option<&'static str> {
    match p {
        TCP => Some("TCP"),
        UDP => Some("UDP"),
        SCTP => Some("SCTP"),
        ICMP => Some("ICMP"),
        ICMPV6 => Some("ICMPv6"),
        _ => None,
    }
}
