//! The compiler's hashing: the fast hasher of its internal tables, and the
//! content hash that is an endpoint direction's policy generation.

use std::hash::{BuildHasherDefault, Hasher};

use ipnet::IpNet;

use super::RuleSet;

/// Multiply-rotate hashing for the compiler's internal tables: keys are
/// small integers, prefixes and short label strings, and `SipHash` was a fifth
/// of the compile time.
#[derive(Clone, Copy, Default)]
pub(super) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(super) type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Policy generation of one endpoint direction: a content hash of its
/// entries (prefixes and the contents of their rule sets); never 0.
pub(super) fn generation<'s>(entries: impl Iterator<Item = (IpNet, &'s RuleSet)>) -> u32 {
    let mut h = FxHasher {
        hash: 0x6e65_7470_6f6c_6765,
    };
    for (prefix, set) in entries {
        match prefix {
            IpNet::V4(n) => {
                h.add(4);
                h.add(u64::from(u32::from(n.network())));
            }
            IpNet::V6(n) => {
                let a = u128::from(n.network());
                h.add(6);
                #[expect(
                    clippy::cast_possible_truncation,
                    reason = "the address is hashed as its two 64-bit halves"
                )]
                {
                    h.add((a >> 64) as u64);
                    h.add(a as u64);
                }
            }
        }
        h.add(u64::from(prefix.prefix_len()));
        h.add(u64::from(set.all));
        h.add(set.ranges.len() as u64);
        for r in &set.ranges {
            h.add(
                u64::from(r.protocol.number()) << 32 | u64::from(r.first) << 16 | u64::from(r.last),
            );
        }
        // Only when present: a set without exceptions hashes as it did
        // before they existed, so an upgrade moves no generation.
        if !set.except.is_empty() {
            h.add(u64::MAX);
            h.add(set.except.len() as u64);
            for r in &set.except {
                h.add(
                    u64::from(r.protocol.number()) << 32
                        | u64::from(r.first) << 16
                        | u64::from(r.last),
                );
            }
        }
    }
    let x = h.finish();
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the high half is folded into the low half first"
    )]
    let folded = (x ^ (x >> 32)) as u32;
    folded | 1
}
