//! The hash of a file's content inside kiln's own cache keys, stat cache
//! and stage digests.
//!
//! These digests never leave kiln as OCI digests (blobs, diffIDs, configs
//! and manifests stay sha256, see [`crate::Digest`]): they only tell whether
//! two files have the same bytes. BLAKE3 does that as securely as sha256
//! and hashes big files about 2.7 times as fast here (50 MB: 11 ms against
//! 29 ms with SHA-NI), which is the content digest of a stage's big file
//! taken right after its last RUN, on the way to a `COPY --from`.

/// The name written before a content digest's hex (`blake3:<hex>`).
pub const CONTENT_ALGORITHM: &str = "blake3";

/// Hashes a file's content in pieces.
#[derive(Debug, Clone, Default)]
pub struct ContentHasher(blake3::Hasher);

impl ContentHasher {
    /// A hasher that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything added.
    pub fn finalize(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// The content digest of `bytes`.
pub fn content_digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_digests_are_blake3_whole_or_in_pieces() {
        // BLAKE3's published test vector for the empty input.
        let empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
        let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(content_digest(b"")), empty);
        assert_eq!(hex(ContentHasher::new().finalize()), empty);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = ContentHasher::new();
        for piece in data.chunks(65_537) {
            h.update(piece);
        }
        assert_eq!(h.finalize(), content_digest(&data));
        assert_ne!(content_digest(&data[1..]), content_digest(&data));
    }
}
