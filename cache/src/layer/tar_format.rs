//! The tar format, byte by byte: a header encoder for deterministic output and a streaming
//! reader that checks every field and enforces [`Limits`] before allocating anything.
//!
//! Written by hand rather than with the `tar` crate because the writer must control every byte
//! (pax only where needed, no uname/gname, fixed pax header names) and the reader must refuse
//! a huge GNU long name or pax header *before* reading it into memory, which the `tar` crate
//! does not do.

use std::io::{self, Read, Write};

use super::{LayerError, Limits};

pub(crate) const BLOCK: usize = 512;

pub(crate) const KIND_FILE: u8 = b'0';
pub(crate) const KIND_LINK: u8 = b'1';
pub(crate) const KIND_SYMLINK: u8 = b'2';
pub(crate) const KIND_CHAR: u8 = b'3';
pub(crate) const KIND_BLOCK: u8 = b'4';
pub(crate) const KIND_DIR: u8 = b'5';
pub(crate) const KIND_FIFO: u8 = b'6';
const KIND_CONTIGUOUS: u8 = b'7';
const KIND_PAX: u8 = b'x';
const KIND_PAX_GLOBAL: u8 = b'g';
const KIND_GNU_LONGNAME: u8 = b'L';
const KIND_GNU_LONGLINK: u8 = b'K';

/// Largest value of an 8-byte octal field (7 digits).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits).
const MAX_OCTAL_12: u64 = 0o77777777777;

/// One tar entry's metadata, as written or as read (pax values already merged in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EntryHeader {
    pub name: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `(name, value)`, sorted by name when written.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

// ---------------------------------------------------------------- writing

/// Append one pax record `"<len> <key>=<value>\n"`; `len` counts itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn put_octal(field: &mut [u8], value: u64) {
    // Zero-padded octal digits, NUL-terminated; callers check that `value` fits.
    let digits = field.len() - 1;
    let mut v = value;
    for slot in field[..digits].iter_mut().rev() {
        *slot = b'0' + (v & 7) as u8;
        v >>= 3;
    }
    field[digits] = 0;
}

/// Base-256 (GNU) encoding, for device numbers too big for octal.
fn put_base256(field: &mut [u8], value: u64) {
    for b in field.iter_mut() {
        *b = 0;
    }
    let n = field.len();
    for (i, byte) in value.to_be_bytes().iter().rev().enumerate() {
        if i < n {
            field[n - 1 - i] = *byte;
        }
    }
    field[0] |= 0x80;
}

fn put_number(field: &mut [u8], value: u64) {
    let max = if field.len() == 8 {
        MAX_OCTAL_8
    } else {
        MAX_OCTAL_12
    };
    if value <= max {
        put_octal(field, value)
    } else {
        put_base256(field, value)
    }
}

fn ustar_block(h: &EntryHeader, name: &[u8], link: &[u8], size: u64, mtime: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    let n = name.len().min(100);
    b[..n].copy_from_slice(&name[..n]);
    put_octal(&mut b[100..108], u64::from(h.mode & 0o7777));
    put_octal(
        &mut b[108..116],
        if h.uid <= MAX_OCTAL_8 { h.uid } else { 0 },
    );
    put_octal(
        &mut b[116..124],
        if h.gid <= MAX_OCTAL_8 { h.gid } else { 0 },
    );
    put_octal(&mut b[124..136], size);
    put_octal(&mut b[136..148], mtime);
    b[156] = h.kind;
    let l = link.len().min(100);
    b[157..157 + l].copy_from_slice(&link[..l]);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    if h.kind == KIND_CHAR || h.kind == KIND_BLOCK {
        put_number(&mut b[329..337], u64::from(h.dev_major));
        put_number(&mut b[337..345], u64::from(h.dev_minor));
    }
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
    put_octal(&mut b[148..155], sum);
    b[155] = b' ';
    b
}

/// Encode `h` as (pax header if needed +) ustar header into `out`. Returns the bytes appended.
pub(crate) fn encode_header(h: &EntryHeader, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    let mut pax = Vec::new();
    if h.name.len() > 100 {
        pax_record(&mut pax, b"path", &h.name);
    }
    if h.link.len() > 100 {
        pax_record(&mut pax, b"linkpath", &h.link);
    }
    if h.uid > MAX_OCTAL_8 {
        pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
    }
    if h.gid > MAX_OCTAL_8 {
        pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
    }
    let size_in_header = if h.size > MAX_OCTAL_12 {
        pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
        0
    } else {
        h.size
    };
    let mtime_in_header = match u64::try_from(h.mtime) {
        Ok(m) if m <= MAX_OCTAL_12 => m,
        _ => {
            pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
            0
        }
    };
    for (key, value) in &h.xattrs {
        let mut k = b"SCHILY.xattr.".to_vec();
        k.extend_from_slice(key);
        pax_record(&mut pax, &k, value);
    }
    if !pax.is_empty() {
        // The pax header's own name: fixed prefix + the entry's base name, cut to fit.
        let base = h
            .name
            .trim_ascii_end()
            .strip_suffix(b"/")
            .unwrap_or(&h.name)
            .rsplit(|&c| c == b'/')
            .next()
            .unwrap_or(b"");
        let mut pname = b"PaxHeaders.0/".to_vec();
        pname.extend_from_slice(&base[..base.len().min(100 - pname.len())]);
        let ph = EntryHeader {
            kind: KIND_PAX,
            mode: 0o644,
            ..EntryHeader::default()
        };
        out.extend_from_slice(&ustar_block(
            &ph,
            &pname,
            b"",
            pax.len() as u64,
            mtime_in_header,
        ));
        out.extend_from_slice(&pax);
        pad(out, pax.len() as u64);
    }
    out.extend_from_slice(&ustar_block(
        h,
        &h.name,
        &h.link,
        size_in_header,
        mtime_in_header,
    ));
    out.len() - start
}

/// Zero bytes that pad `len` bytes of data to a whole block.
pub(crate) fn padding(len: u64) -> usize {
    let rem = (len % BLOCK as u64) as usize;
    if rem == 0 { 0 } else { BLOCK - rem }
}

fn pad(out: &mut Vec<u8>, len: u64) {
    out.resize(out.len() + padding(len), 0);
}

/// The end-of-archive marker: two zero blocks.
pub(crate) fn write_end<W: Write>(mut out: W) -> io::Result<u64> {
    out.write_all(&[0u8; 2 * BLOCK])?;
    Ok(2 * BLOCK as u64)
}

// ---------------------------------------------------------------- reading

/// A streaming tar reader. [`TarReader::next_entry`] returns the next entry's header; its data
/// is then read through [`TarReader::data`] (whatever is left unread is skipped).
#[derive(Debug)]
pub(crate) struct TarReader<R> {
    inner: R,
    offset: u64,
    limits: Limits,
    entries: u64,
    total: u64,
    /// Data bytes of the current entry not yet read, and padding after them.
    remaining: u64,
    pad: u64,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R, limits: Limits) -> Self {
        TarReader {
            inner,
            offset: 0,
            limits,
            entries: 0,
            total: 0,
            remaining: 0,
            pad: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    fn read_err(&self, source: io::Error) -> LayerError {
        LayerError::ReadTar {
            offset: self.offset,
            source,
        }
    }

    /// Fill `buf` completely; `Ok(false)` on a clean EOF before the first byte.
    fn read_block(&mut self, buf: &mut [u8; BLOCK]) -> Result<bool, LayerError> {
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        if got == 0 {
            return Ok(false);
        }
        if got < BLOCK {
            self.offset += got as u64;
            return Err(self.read_err(io::ErrorKind::UnexpectedEof.into()));
        }
        self.offset += BLOCK as u64;
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), LayerError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(self.read_err(io::ErrorKind::UnexpectedEof.into())),
                Ok(k) => {
                    n -= k as u64;
                    self.offset += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        Ok(())
    }

    /// Read a whole extension payload (pax, GNU long name), after the limit check.
    fn read_payload(&mut self, size: u64, name: &[u8]) -> Result<Vec<u8>, LayerError> {
        if size > self.limits.max_header_bytes {
            return Err(LayerError::HeaderTooLarge {
                entry: display_name(name),
                size,
                limit: self.limits.max_header_bytes,
            });
        }
        let mut data = vec![0u8; size as usize];
        let mut got = 0;
        while got < data.len() {
            match self.inner.read(&mut data[got..]) {
                Ok(0) => return Err(self.read_err(io::ErrorKind::UnexpectedEof.into())),
                Ok(k) => {
                    got += k;
                    self.offset += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        self.skip(padding(size) as u64)?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive.
    pub(crate) fn next_entry(&mut self) -> Result<Option<EntryHeader>, LayerError> {
        if self.done {
            return Ok(None);
        }
        // Skip what the caller left of the previous entry.
        let left = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.skip(left)?;

        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        loop {
            let header_offset = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.read_block(&mut block)? || block.iter().all(|&b| b == 0) {
                // A zero block (or a clean EOF) ends the archive; what follows is ignored,
                // as docker and containerd do.
                self.done = true;
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(LayerError::BadHeader {
                        offset: header_offset,
                        problem: "the archive ends after an extended header",
                    });
                }
                return Ok(None);
            }
            let h = parse_block(&block, header_offset)?;
            match h.kind {
                KIND_GNU_LONGNAME | KIND_GNU_LONGLINK | KIND_PAX => {
                    let data = self.read_payload(h.size, &h.name)?;
                    let slot = match h.kind {
                        KIND_GNU_LONGNAME => &mut long_name,
                        KIND_GNU_LONGLINK => &mut long_link,
                        _ => &mut pax,
                    };
                    if slot.is_some() {
                        return Err(LayerError::BadHeader {
                            offset: header_offset,
                            problem: "two extended headers of one kind for one entry",
                        });
                    }
                    *slot = Some(data);
                }
                KIND_PAX_GLOBAL => {
                    // Global pax headers (comments from `git archive`, ...) change nothing kiln
                    // reads; skip them within the header limit.
                    self.read_payload(h.size, &h.name)?;
                }
                _ => {
                    let mut h = h;
                    if let Some(mut n) = long_name {
                        trim_nuls(&mut n);
                        h.name = n;
                    }
                    if let Some(mut l) = long_link {
                        trim_nuls(&mut l);
                        h.link = l;
                    }
                    if let Some(p) = pax {
                        apply_pax(&mut h, &p, header_offset)?;
                    }
                    return self.accept(h).map(Some);
                }
            }
        }
    }

    fn accept(&mut self, h: EntryHeader) -> Result<EntryHeader, LayerError> {
        for p in [&h.name, &h.link] {
            if p.len() > self.limits.max_path_bytes {
                return Err(LayerError::PathTooLong {
                    entry: display_name(&p[..64.min(p.len())]),
                    len: p.len(),
                    limit: self.limits.max_path_bytes,
                });
            }
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(LayerError::TooManyEntries {
                entry: display_name(&h.name),
                limit: self.limits.max_entries,
            });
        }
        self.total = self.total.saturating_add(h.size);
        if self.total > self.limits.max_total_bytes {
            return Err(LayerError::TooLarge {
                entry: display_name(&h.name),
                size: h.size,
                limit: self.limits.max_total_bytes,
            });
        }
        match h.kind {
            KIND_FILE | KIND_LINK | KIND_SYMLINK | KIND_CHAR | KIND_BLOCK | KIND_DIR
            | KIND_FIFO => {}
            other => {
                return Err(LayerError::UnsupportedEntry {
                    entry: display_name(&h.name),
                    kind: char::from(other),
                });
            }
        }
        self.remaining = h.size;
        self.pad = padding(h.size) as u64;
        Ok(h)
    }

    /// Read the current entry's data.
    pub(crate) fn data(&mut self) -> EntryData<'_, R> {
        EntryData { reader: self }
    }

    /// After the last entry: the archive's remaining bytes are not read.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

/// [`Read`] over the current entry's data.
#[derive(Debug)]
pub(crate) struct EntryData<'a, R> {
    reader: &'a mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &mut *self.reader;
        if r.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(r.remaining) as usize;
        let n = r.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the tar ends inside an entry, at byte {}", r.offset),
            ));
        }
        r.remaining -= n as u64;
        r.offset += n as u64;
        Ok(n)
    }
}

pub(crate) fn display_name(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn trim_nuls(v: &mut Vec<u8>) {
    while v.last() == Some(&0) {
        v.pop();
    }
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn parse_number(field: &[u8], offset: u64, what: &'static str) -> Result<u64, LayerError> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // Base-256: big-endian, the first byte's top bit is the marker. Negative (0xff) is
        // refused; only mtime could use it and kiln has no use for pre-1970 times this way.
        if field[0] == 0xff {
            return Err(LayerError::BadHeader {
                offset,
                problem: what,
            });
        }
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or(LayerError::BadHeader {
                    offset,
                    problem: what,
                })?;
        }
        return Ok(v);
    }
    let mut v: u64 = 0;
    let mut seen_digit = false;
    for &b in field {
        match b {
            b' ' if !seen_digit => {}
            b'0'..=b'7' => {
                seen_digit = true;
                v = v
                    .checked_mul(8)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .ok_or(LayerError::BadHeader {
                        offset,
                        problem: what,
                    })?;
            }
            0 | b' ' => break,
            _ => {
                return Err(LayerError::BadHeader {
                    offset,
                    problem: what,
                });
            }
        }
    }
    Ok(v)
}

fn parse_block(b: &[u8; BLOCK], offset: u64) -> Result<EntryHeader, LayerError> {
    let stored = parse_number(&b[148..156], offset, "the checksum field is not a number")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &x) in b.iter().enumerate() {
        let x = if (148..156).contains(&i) { b' ' } else { x };
        unsigned += u64::from(x);
        signed += i64::from(x as i8);
    }
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return Err(LayerError::BadHeader {
            offset,
            problem: "checksum mismatch",
        });
    }
    let mut name = cstr(&b[0..100]).to_vec();
    let magic = &b[257..263];
    if magic == b"ustar\0" {
        let prefix = cstr(&b[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let mode = parse_number(&b[100..108], offset, "the mode field is not a number")?;
    Ok(EntryHeader {
        name,
        kind: if b[156] == 0 || b[156] == KIND_CONTIGUOUS {
            KIND_FILE
        } else {
            b[156]
        },
        mode: (mode & 0o7777) as u32,
        uid: parse_number(&b[108..116], offset, "the uid field is not a number")?,
        gid: parse_number(&b[116..124], offset, "the gid field is not a number")?,
        size: parse_number(&b[124..136], offset, "the size field is not a number")?,
        mtime: i64::try_from(parse_number(
            &b[136..148],
            offset,
            "the mtime field is not a number",
        )?)
        .map_err(|_| LayerError::BadHeader {
            offset,
            problem: "the mtime is out of range",
        })?,
        link: cstr(&b[157..257]).to_vec(),
        dev_major: u32::try_from(parse_number(&b[329..337], offset, "bad device major")?).map_err(
            |_| LayerError::BadHeader {
                offset,
                problem: "device major out of range",
            },
        )?,
        dev_minor: u32::try_from(parse_number(&b[337..345], offset, "bad device minor")?).map_err(
            |_| LayerError::BadHeader {
                offset,
                problem: "device minor out of range",
            },
        )?,
        xattrs: Vec::new(),
    })
}

fn parse_decimal(v: &[u8], offset: u64) -> Result<u64, LayerError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(LayerError::BadHeader {
            offset,
            problem: "a pax number is not a number",
        })
}

fn apply_pax(h: &mut EntryHeader, data: &[u8], offset: u64) -> Result<(), LayerError> {
    let bad = LayerError::BadHeader {
        offset,
        problem: "malformed pax record",
    };
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&c| c == b' ')
            .ok_or(LayerError::BadHeader {
                offset,
                problem: "malformed pax record",
            })?;
        let len = usize::try_from(parse_decimal(&rest[..sp], offset)?).map_err(|_| {
            LayerError::BadHeader {
                offset,
                problem: "malformed pax record",
            }
        })?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad);
        }
        let record = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = record
            .iter()
            .position(|&c| c == b'=')
            .ok_or(LayerError::BadHeader {
                offset,
                problem: "malformed pax record",
            })?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => h.name = value.to_vec(),
            b"linkpath" => h.link = value.to_vec(),
            b"size" => h.size = parse_decimal(value, offset)?,
            b"uid" => h.uid = parse_decimal(value, offset)?,
            b"gid" => h.gid = parse_decimal(value, offset)?,
            b"mtime" => {
                // "seconds[.fraction]", possibly negative.
                let text = std::str::from_utf8(value).map_err(|_| LayerError::BadHeader {
                    offset,
                    problem: "a pax mtime is not a number",
                })?;
                let whole = text.split('.').next().unwrap_or("");
                h.mtime = whole.parse::<i64>().map_err(|_| LayerError::BadHeader {
                    offset,
                    problem: "a pax mtime is not a number",
                })?;
            }
            _ => {
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    h.xattrs.push((x.to_vec(), value.to_vec()));
                } else if key.starts_with(b"GNU.sparse.") {
                    return Err(LayerError::UnsupportedEntry {
                        entry: display_name(&h.name),
                        kind: 'S',
                    });
                }
                // Other keys (atime, ctime, comment, charset, ...) change nothing kiln keeps.
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", &[b'a'; 93]);
        // 3 digits + space + "path=" + 93 + newline = 103? len field must equal total length
        let text = String::from_utf8(v.clone()).unwrap_or_default();
        let len: usize = text.split(' ').next().unwrap_or("0").parse().unwrap_or(0);
        assert_eq!(len, v.len());
        let mut w = Vec::new();
        pax_record(&mut w, b"k", b"v");
        assert_eq!(w, b"6 k=v\n");
    }

    #[test]
    fn header_round_trips_through_the_reader() {
        let h = EntryHeader {
            name: [b'x'; 150].to_vec(),
            kind: KIND_FILE,
            mode: 0o4755,
            uid: 5_000_000,
            gid: 7,
            size: 3,
            mtime: -5,
            link: Vec::new(),
            xattrs: vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2])],
            ..EntryHeader::default()
        };
        let mut out = Vec::new();
        encode_header(&h, &mut out);
        out.extend_from_slice(b"abc");
        out.resize(out.len() + padding(3), 0);
        write_end(&mut out).unwrap_or_default();
        let mut r = TarReader::new(&out[..], Limits::default());
        let got = r.next_entry().ok().flatten();
        assert_eq!(got.as_ref(), Some(&h));
        let mut data = Vec::new();
        r.data().read_to_end(&mut data).ok();
        assert_eq!(data, b"abc");
        assert!(matches!(r.next_entry(), Ok(None)));
    }
}
