//! sha256 digests: parsing, hashing while streaming.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::StoreError;

/// A `sha256:<64 lowercase hex>` content digest, the only algorithm the
/// store names blobs by.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex characters, as `docker images` shows an id.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }

    /// The digest of `data`.
    pub fn of_bytes(data: &[u8]) -> Digest {
        let mut h = Hasher::new();
        h.update(data);
        h.finish()
    }

    /// Builds a digest from 64 lowercase hex characters.
    pub fn from_hex(hex: &str) -> Result<Digest, StoreError> {
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(StoreError::InvalidDigest {
                digest: hex.to_owned(),
                reason: "a sha256 digest has 64 lowercase hex characters",
            });
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    /// The digest as oci-spec's type.
    pub fn to_oci(&self) -> oci_spec::image::Digest {
        // A `sha256:` + 64 hex string always parses; fall back to the
        // generic constructor path through `FromStr` either way.
        match oci_spec::image::Digest::from_str(&self.to_string()) {
            Ok(d) => d,
            Err(_) => unreachable_digest(),
        }
    }

    /// Converts from oci-spec's type; only sha256 is accepted.
    pub fn from_oci(d: &oci_spec::image::Digest) -> Result<Digest, StoreError> {
        d.to_string().parse()
    }
}

#[expect(
    clippy::panic,
    reason = "a valid sha256 digest always converts; not reachable from input"
)]
fn unreachable_digest() -> oci_spec::image::Digest {
    panic!("a sha256 digest failed to convert to oci-spec's type")
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl FromStr for Digest {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Digest::from_hex(hex).map_err(|_| StoreError::InvalidDigest {
                digest: s.to_owned(),
                reason: "a sha256 digest has 64 lowercase hex characters",
            }),
            Some(_) => Err(StoreError::InvalidDigest {
                digest: s.to_owned(),
                reason: "only sha256 digests are supported",
            }),
            None => Err(StoreError::InvalidDigest {
                digest: s.to_owned(),
                reason: "expected `sha256:<hex>`",
            }),
        }
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental sha256.
#[derive(Debug, Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    /// How many bytes were fed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let out = self.inner.finalize();
        let mut hex = String::with_capacity(64);
        for b in out.iter() {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 15)]));
        }
        Digest { hex }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A reader that hashes what passes through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Reads the rest of the stream (so the digest covers all of it) and
    /// returns the digest and the byte count.
    pub fn drain_and_finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let len = self.hasher.len();
        Ok((self.hasher.finish(), len))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that hashes what passes through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The inner writer, the digest and byte count of what was written.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes handed to a [`PipeHasher`]'s thread as they are, without a copy
/// (a mapping of a big file, say).
pub type SharedBytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// What goes to the hashing thread: a filled block, or shared bytes.
enum Chunk {
    Block(Vec<u8>),
    Shared(SharedBytes),
    /// Everything was sent (a tap may outlive the hasher).
    End,
}

/// Hands [`SharedBytes`] to a [`PipeHasher`]'s thread, in order with what
/// was written to the hasher before (after its [`Write::flush`]).
#[derive(Clone)]
pub struct HashTap(std::sync::mpsc::SyncSender<Chunk>);

impl fmt::Debug for HashTap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashTap")
    }
}

impl HashTap {
    /// Hashes `bytes` after everything flushed to the hasher so far.
    pub fn send(&self, bytes: SharedBytes) -> io::Result<()> {
        self.0
            .send(Chunk::Shared(bytes))
            .map_err(|_| io::Error::other("the layer hashing thread stopped"))
    }
}

/// A sink that hashes what is written to it on another thread, so that
/// the writer's own work (walking a tree, reading files, faulting in
/// mapped pages) overlaps the hashing. Bytes are handed over in blocks of
/// [`PipeHasher::BLOCK`], through a few recycled buffers, or without a
/// copy through a [`HashTap`].
#[derive(Debug)]
pub struct PipeHasher {
    buf: Vec<u8>,
    to_hasher: Option<std::sync::mpsc::SyncSender<Chunk>>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    hasher: Option<std::thread::JoinHandle<Hasher>>,
    /// The hasher when no thread could be started (hashes inline).
    inline: Option<Hasher>,
}

impl Default for PipeHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl PipeHasher {
    /// Bytes handed to the hashing thread at once.
    pub const BLOCK: usize = 256 * 1024;

    /// Chunks waiting for the hashing thread, at most.
    const QUEUE: usize = 8;

    /// A tap to hand bytes over without a copy; `None` when the hashing
    /// is done on the caller's thread.
    pub fn tap(&self) -> Option<HashTap> {
        self.to_hasher.clone().map(HashTap)
    }

    /// A sink with its hashing thread started (or, if none can be, one
    /// that hashes on the caller's).
    pub fn new() -> Self {
        // Room for a few chunks: a writer that handed over a big file's
        // mappings goes on with the files after it meanwhile.
        let (to_hasher, chunks) = std::sync::mpsc::sync_channel::<Chunk>(Self::QUEUE);
        let (give_back, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let spawned = std::thread::Builder::new()
            .name("layer-hash".to_owned())
            .spawn(move || {
                let mut h = Hasher::new();
                while let Ok(chunk) = chunks.recv() {
                    match chunk {
                        Chunk::Block(mut block) => {
                            h.update(&block);
                            block.clear();
                            // A full pool just drops the buffer.
                            let _ = give_back.try_send(block);
                        }
                        Chunk::Shared(bytes) => h.update((*bytes).as_ref()),
                        Chunk::End => break,
                    }
                }
                h
            });
        match spawned {
            Ok(handle) => Self {
                buf: Vec::with_capacity(Self::BLOCK),
                to_hasher: Some(to_hasher),
                recycled,
                hasher: Some(handle),
                inline: None,
            },
            Err(_) => Self {
                buf: Vec::new(),
                to_hasher: None,
                recycled,
                hasher: None,
                inline: Some(Hasher::new()),
            },
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let next = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(Self::BLOCK));
        let full = std::mem::replace(&mut self.buf, next);
        match &self.to_hasher {
            Some(tx) => tx
                .send(Chunk::Block(full))
                .map_err(|_| io::Error::other("the layer hashing thread stopped")),
            None => Ok(()),
        }
    }

    /// The digest and byte count of everything written.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        if let Some(h) = self.inline.take() {
            let len = h.len();
            return Ok((h.finish(), len));
        }
        if !self.buf.is_empty() {
            self.send()?;
        }
        if let Some(tx) = self.to_hasher.take() {
            let _ = tx.send(Chunk::End);
        }
        let h = self
            .hasher
            .take()
            .ok_or_else(|| io::Error::other("no layer hashing thread"))?
            .join()
            .map_err(|_| io::Error::other("the layer hashing thread panicked"))?;
        let len = h.len();
        Ok((h.finish(), len))
    }
}

impl Write for PipeHasher {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(h) = self.inline.as_mut() {
            h.update(data);
            return Ok(data.len());
        }
        let mut rest = data;
        while !rest.is_empty() {
            let room = Self::BLOCK - self.buf.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(now);
            rest = later;
            if self.buf.len() == Self::BLOCK {
                self.send()?;
            }
        }
        Ok(data.len())
    }

    /// Hands a partly filled block over (so that a [`HashTap`] may go
    /// next).
    fn flush(&mut self) -> io::Result<()> {
        if self.to_hasher.is_some() && !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

impl Drop for PipeHasher {
    fn drop(&mut self) {
        // Unfinished (an error on the way): stop the thread.
        if let Some(tx) = self.to_hasher.take() {
            let _ = tx.send(Chunk::End);
        }
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_hasher_gives_the_digest_of_all_it_was_given() {
        let data: Vec<u8> = (0..(3 * PipeHasher::BLOCK + 1234))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for cut in [
            0,
            1,
            1000,
            PipeHasher::BLOCK - 1,
            PipeHasher::BLOCK,
            2 * PipeHasher::BLOCK + 7,
        ] {
            let mut p = PipeHasher::new();
            p.write_all(&data[..cut]).unwrap_or_else(|e| panic!("{e}"));
            for chunk in data[cut..].chunks(4096 + 3) {
                p.write_all(chunk).unwrap_or_else(|e| panic!("{e}"));
            }
            let (d, n) = p.finish().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(n, data.len() as u64);
            assert_eq!(d, Digest::of_bytes(&data), "cut at {cut}");
        }
        let (d, n) = PipeHasher::new().finish().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((d, n), (Digest::of_bytes(b""), 0));
    }

    #[test]
    fn bytes_tapped_in_hash_in_order_with_those_written() {
        let data: Vec<u8> = (0..(2 * PipeHasher::BLOCK + 999))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let shared =
            |r: std::ops::Range<usize>| -> SharedBytes { std::sync::Arc::new(data[r].to_vec()) };
        let mut p = PipeHasher::new();
        let tap = p.tap().expect("a hashing thread");
        p.write_all(&data[..1000]).unwrap_or_else(|e| panic!("{e}"));
        p.flush().unwrap_or_else(|e| panic!("{e}"));
        tap.send(shared(1000..PipeHasher::BLOCK + 10))
            .unwrap_or_else(|e| panic!("{e}"));
        p.write_all(&data[PipeHasher::BLOCK + 10..PipeHasher::BLOCK + 20])
            .unwrap_or_else(|e| panic!("{e}"));
        p.flush().unwrap_or_else(|e| panic!("{e}"));
        tap.send(shared(PipeHasher::BLOCK + 20..data.len() - 5))
            .unwrap_or_else(|e| panic!("{e}"));
        p.write_all(&data[data.len() - 5..])
            .unwrap_or_else(|e| panic!("{e}"));
        let (d, n) = p.finish().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, data.len() as u64);
        assert_eq!(d, Digest::of_bytes(&data));
        // The hashing thread is gone: a tap left over says so.
        assert!(tap.send(shared(0..1)).is_err());
    }

    #[test]
    fn empty_digest_is_the_well_known_one() {
        assert_eq!(
            Digest::of_bytes(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_rejects_bad_digests() {
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!("md5:e3b0".parse::<Digest>().is_err());
        assert!(
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
                .parse::<Digest>()
                .is_err()
        );
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .expect("valid");
        assert_eq!(d.short(), "e3b0c44298fc");
        assert_eq!(Digest::from_oci(&d.to_oci()).expect("round trip"), d);
    }
}
