//! Whether this process may load BPF programs and change links.

/// Whether the effective user is root. Capabilities (`CAP_BPF`, `CAP_NET_ADMIN`)
/// are checked by the kernel at each call; this is for early, clear errors.
#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
