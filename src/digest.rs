//! FNV-1a (64 bit): the one small, stable, dependency-free hash `vlmq` uses
//! for resume fingerprints, resume-state checksums and checkpoint tensor
//! digests. It detects accidental change (every single-byte change changes
//! it: each step is a bijection of the state), not deliberate tampering.

/// An FNV-1a 64-bit hasher.
pub(crate) struct Fnv(u64);

impl Fnv {
    /// The FNV offset basis.
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    /// Feeds bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Feeds floats as little-endian bytes.
    pub(crate) fn floats(&mut self, v: impl IntoIterator<Item = f32>) {
        for x in v {
            self.bytes(&x.to_le_bytes());
        }
    }

    /// The hash as 16 lower-case hex digits.
    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The hex digest of `bytes`.
pub(crate) fn digest_hex(bytes: &[u8]) -> String {
    let mut h = Fnv::new();
    h.bytes(bytes);
    h.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(digest_hex(b""), "cbf29ce484222325");
        assert_eq!(digest_hex(b"a"), "af63dc4c8601ec8c");
    }
}
