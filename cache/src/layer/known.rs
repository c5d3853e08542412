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

use std::collections::HashMap;

/// Files bigger than this are not recorded (reading them is not dominated
/// by per-file system calls).
pub const MAX_FILE: u64 = 64 * 1024;
/// At most this many bytes of content are recorded per layer.
pub const MAX_TOTAL: usize = 32 << 20;

/// The content of some regular files of a layer, by path in the layer
/// (as in its tar: relative, no leading `./`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownFiles {
    data: Vec<u8>,
    /// Path -> (offset, length) in `data`.
    files: HashMap<Vec<u8>, (usize, usize)>,
}

const MAGIC: &[u8] = b"kiln-known-files-1\n";

impl KnownFiles {
    /// How many files are known.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no file is known.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The content of `path`, if known.
    pub fn get(&self, path: &[u8]) -> Option<&[u8]> {
        let &(off, len) = self.files.get(path)?;
        self.data.get(off..off + len)
    }

    /// Records `content` for `path`, unless the file is too big or the
    /// set is full. Returns whether it was recorded.
    pub fn record(&mut self, path: &[u8], content: &[u8]) -> bool {
        if content.len() as u64 > MAX_FILE || self.data.len() + content.len() > MAX_TOTAL {
            return false;
        }
        let off = self.data.len();
        self.data.extend_from_slice(content);
        self.files.insert(path.to_vec(), (off, content.len()));
        true
    }

    /// Keeps only the paths `keep` says yes to (the data of the others
    /// stays until the set is serialized again).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        self.files.retain(|p, _| keep(p));
    }

    /// The set as bytes, for [`KnownFiles::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut paths: Vec<&Vec<u8>> = self.files.keys().collect();
        paths.sort();
        let body: usize = self.files.values().map(|&(_, l)| l).sum();
        let mut out = Vec::with_capacity(MAGIC.len() + 8 + paths.len() * 48 + body);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(paths.len() as u64).to_le_bytes());
        for p in &paths {
            let (_, len) = self.files[*p];
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
        for p in &paths {
            let (off, len) = self.files[*p];
            out.extend_from_slice(&self.data[off..off + len]);
        }
        out
    }

    /// A set written by [`KnownFiles::to_bytes`]; `None` for anything else
    /// (a truncated or foreign file is no error: nothing is known).
    pub fn from_bytes(bytes: &[u8]) -> Option<KnownFiles> {
        let mut r = Cursor(bytes.strip_prefix(MAGIC)?);
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
        let data = r.0;
        let mut files = HashMap::with_capacity(n);
        let mut off = 0usize;
        for (path, len) in index {
            let end = off.checked_add(len)?;
            if end > data.len() {
                return None;
            }
            files.insert(path, (off, len));
            off = end;
        }
        if off != data.len() {
            return None;
        }
        Some(KnownFiles {
            data: data.to_vec(),
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
