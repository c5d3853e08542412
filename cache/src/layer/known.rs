//! Contents the layer writer need not read again: the small regular files of
//! a layer, by path, recorded while its tar was written.
//!
//! A rebuild of a COPY hard-links the files it did not change from the
//! previous result's snapshot. Those inodes are that snapshot's: their
//! content is what the previous layer's tar holds at the same path (a
//! snapshot is never written in place). Hashing the new layer then needs
//! only their `lstat` for the header; the bytes come from here instead of
//! an open, an xattr list, a read and a close per file, which is most of
//! the cost of hashing thousands of small files.
//!
//! The caller decides which paths are such links ([`KnownFiles::retain`])
//! before it hands the set to [`write_layer_reusing`](super::write_layer_reusing);
//! the writer still checks that each file's size is the recorded one.

/// Files bigger than this are not recorded (reading them is not dominated
/// by per-file system calls).
pub const MAX_FILE: u64 = 64 * 1024;
/// At most this many bytes of content are recorded per layer.
pub const MAX_TOTAL: usize = 32 << 20;

/// The content of some regular files of a layer, by path in the layer
/// (as in its tar: relative, no leading `./`).
#[derive(Debug, Default, Clone)]
pub struct KnownFiles {
    /// Buffers holding the contents (a loaded file is one, untouched).
    chunks: Vec<Vec<u8>>,
    files: crate::FileMap<Vec<u8>, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    chunk: usize,
    off: usize,
    len: usize,
    /// Whether the writer took this content (see [`KnownFiles::take`]).
    used: bool,
}

const MAGIC: &[u8] = b"kiln-known-files-1\n";

/// Two sets are equal when they know the same paths with the same bytes
/// (however their data is laid out).
impl PartialEq for KnownFiles {
    fn eq(&self, other: &KnownFiles) -> bool {
        self.files.len() == other.files.len()
            && self
                .files
                .keys()
                .all(|p| self.get(p).is_some() && self.get(p) == other.get(p))
    }
}

impl Eq for KnownFiles {}

impl KnownFiles {
    /// How many files are known.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no file is known.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn bytes_of(&self, e: &Entry) -> Option<&[u8]> {
        self.chunks.get(e.chunk)?.get(e.off..e.off + e.len)
    }

    /// The content of `path`, if known.
    pub fn get(&self, path: &[u8]) -> Option<&[u8]> {
        self.bytes_of(self.files.get(path)?)
    }

    /// The content of `path`, if known, marking it as used (see
    /// [`KnownFiles::keep_used`]).
    pub fn take(&mut self, path: &[u8]) -> Option<&[u8]> {
        let e = self.files.get_mut(path)?;
        e.used = true;
        let e = *e;
        self.bytes_of(&e)
    }

    /// Forgets every path not taken since the last call.
    pub fn keep_used(&mut self) {
        self.files.retain(|_, e| std::mem::take(&mut e.used));
    }

    /// Records `content` for `path`, unless the file is too big or the
    /// set is full. Returns whether it was recorded.
    pub fn record(&mut self, path: &[u8], content: &[u8]) -> bool {
        let total: usize = self.chunks.iter().map(Vec::len).sum();
        if content.len() as u64 > MAX_FILE || total + content.len() > MAX_TOTAL {
            return false;
        }
        if self.chunks.is_empty() {
            self.chunks.push(Vec::new());
        }
        let chunk = self.chunks.len() - 1;
        let data = &mut self.chunks[chunk];
        let off = data.len();
        data.extend_from_slice(content);
        self.files.insert(
            path.to_vec(),
            Entry {
                chunk,
                off,
                len: content.len(),
                used: false,
            },
        );
        true
    }

    /// Adds every file of `other` (its content replacing this set's for
    /// the same path), moving its buffers over.
    pub fn absorb(&mut self, other: KnownFiles) {
        let base = self.chunks.len();
        self.chunks.extend(other.chunks);
        for (p, mut e) in other.files {
            e.chunk += base;
            self.files.insert(p, e);
        }
    }

    /// Keeps only the paths `keep` says yes to (the data of the others
    /// stays until the set is serialized again).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        self.files.retain(|p, _| keep(p));
    }

    /// The set as bytes, for [`KnownFiles::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes [`KnownFiles::to_bytes`] to `out`.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut paths: Vec<(&Vec<u8>, &[u8])> = self
            .files
            .iter()
            .filter_map(|(p, e)| Some((p, self.bytes_of(e)?)))
            .collect();
        paths.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out.write_all(MAGIC)?;
        out.write_all(&(paths.len() as u64).to_le_bytes())?;
        for (p, content) in &paths {
            out.write_all(&(p.len() as u32).to_le_bytes())?;
            out.write_all(p)?;
            out.write_all(&(content.len() as u32).to_le_bytes())?;
        }
        for (_, content) in &paths {
            out.write_all(content)?;
        }
        Ok(())
    }

    /// A set written by [`KnownFiles::to_bytes`]; `None` for anything else
    /// (a truncated or foreign file is no error: nothing is known).
    pub fn from_bytes(bytes: &[u8]) -> Option<KnownFiles> {
        KnownFiles::from_vec(bytes.to_vec(), 0)
    }

    /// [`KnownFiles::from_bytes`] of `bytes[start..]`, keeping `bytes` as
    /// the data (no copy of the contents).
    pub fn from_vec(bytes: Vec<u8>, start: usize) -> Option<KnownFiles> {
        let mut r = Cursor(bytes.get(start..)?.strip_prefix(MAGIC)?);
        let n = usize::try_from(r.u64()?).ok()?;
        // Each entry takes at least 8 bytes: a count beyond that is corrupt.
        if n > r.0.len() / 8 {
            return None;
        }
        let mut index = Vec::with_capacity(n);
        for _ in 0..n {
            let plen = r.u32()? as usize;
            let path = r.take(plen)?.to_vec();
            let len = r.u32()? as usize;
            index.push((path, len));
        }
        let mut off = bytes.len() - r.0.len();
        let mut files = crate::FileMap::with_capacity_and_hasher(n, Default::default());
        for (path, len) in index {
            let end = off.checked_add(len)?;
            if end > bytes.len() {
                return None;
            }
            files.insert(
                path,
                Entry {
                    chunk: 0,
                    off,
                    len,
                    used: false,
                },
            );
            off = end;
        }
        if off != bytes.len() {
            return None;
        }
        Some(KnownFiles {
            chunks: vec![bytes],
            files,
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damaged_bytes() {
        let mut k = KnownFiles::default();
        assert!(k.record(b"a/b.c", b"hello"));
        assert!(k.record(b"a/empty", b""));
        assert!(k.record(b"z", b"last"));
        assert!(!k.record(b"big", &vec![0u8; MAX_FILE as usize + 1]));
        let bytes = k.to_bytes();
        let back = KnownFiles::from_bytes(&bytes).expect("round trip");
        assert_eq!(back.get(b"a/b.c"), Some(&b"hello"[..]));
        assert_eq!(back.get(b"a/empty"), Some(&b""[..]));
        assert_eq!(back.get(b"z"), Some(&b"last"[..]));
        assert_eq!(back.get(b"big"), None);
        assert_eq!(back.len(), 3);
        // Every truncation, and trailing garbage, is refused without a panic.
        for cut in 0..bytes.len() {
            assert!(
                KnownFiles::from_bytes(&bytes[..cut]).is_none(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(KnownFiles::from_bytes(&longer).is_none());
        // A huge count in a short file.
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(KnownFiles::from_bytes(&forged).is_none());
    }

    #[test]
    fn retain_drops_paths() {
        let mut k = KnownFiles::default();
        k.record(b"keep", b"1");
        k.record(b"drop", b"2");
        k.retain(|p| p == b"keep");
        assert_eq!(k.get(b"drop"), None);
        let back = KnownFiles::from_bytes(&k.to_bytes()).expect("round trip");
        assert_eq!(back.get(b"keep"), Some(&b"1"[..]));
        assert_eq!(back.len(), 1);
    }
}
