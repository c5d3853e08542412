//! Compression of layer blobs: none, gzip, zstd.
//!
//! ```text
//! pub enum Compression { None, Gzip, Zstd }   // media_type_suffix(): "", "+gzip", "+zstd"
//! pub fn compress<R: Read, W: Write>(input: R, out: W, c: Compression, threads: usize) -> Result<u64, CompressError>;
//! pub fn decompress<R: Read + 'static>(input: R) -> Result<Box<dyn Read>, CompressError>;
//! ```
//!
//! `compress` returns the number of bytes written to `out`. Compressing is never on the build
//! path: the store keeps the diffID (digest of the uncompressed tar) and compresses on export.
//!
//! # Parallel gzip
//!
//! Gzip runs on `threads` cores the way pigz does, and its output is byte-identical for any
//! thread count (1, 2, 4, ...):
//!
//! - the input is cut into fixed 1 MiB blocks; each is compressed on its own as raw deflate
//!   (level 6), with the previous block's last 32 KiB as preset dictionary, so the ratio stays
//!   close to single-stream gzip;
//! - every block but the last ends with a sync flush (an empty stored block, which byte-aligns
//!   the output), the last with the final block bit; concatenated they form one deflate
//!   stream, so the result is one gzip member that every reader (including ones that stop
//!   after the first member) reads whole;
//! - each block's CRC-32 is computed with its compression and combined in order
//!   (`crc32_combine`); the header is fixed (mtime 0, OS 3), so the bytes depend only on the
//!   input.
//!
//! Nothing in a block's output depends on scheduling, which is why the thread count cannot
//! change the bytes. The reader thread stays at most `2 × threads` blocks ahead, so memory
//! stays flat whatever the input size.
//!
//! zstd uses the `zstd` crate single-threaded at level 3 (`threads` is ignored for zstd).
//!
//! # Decompression
//!
//! [`decompress`] sniffs the first bytes: `1f 8b` gzip (multi-member aware), `28 b5 2f fd`
//! zstd, anything else is returned as is (an uncompressed tar). xz and bzip2 are recognised
//! and refused with a clear error. It streams: nothing is buffered beyond the codec's window.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use flate2::{Compress, FlushCompress, Status};

/// Size of one independently compressed gzip block.
pub const GZIP_BLOCK: usize = 1 << 20;
/// Deflate window: the dictionary each block gets from the one before.
const WINDOW: usize = 32 * 1024;
/// Gzip level used (gzip's own default).
const GZIP_LEVEL: u32 = 6;
/// More gzip workers than this buy nothing (and could exhaust threads on a bad argument).
const MAX_THREADS: usize = 256;
/// zstd level used (the zstd CLI's default).
const ZSTD_LEVEL: i32 = 3;

/// A layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Plain tar.
    #[default]
    None,
    /// gzip (RFC 1952).
    Gzip,
    /// zstd (RFC 8878).
    Zstd,
}

impl Compression {
    /// Suffix of the layer media type: `""`, `"+gzip"` or `"+zstd"`.
    pub fn media_type_suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => "+gzip",
            Compression::Zstd => "+zstd",
        }
    }

    /// The compression a layer media type names (OCI or Docker v2 schema 2), if any.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// Name as on the command line: `none`, `gzip`, `zstd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = CompressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            other => Err(CompressError::UnknownName {
                name: other.to_owned(),
            }),
        }
    }
}

/// Why compression or decompression failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// Reading the input failed.
    #[error("cannot read the {what} input")]
    Read {
        /// `uncompressed` or `compressed`.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("cannot write the `{compression}` output")]
    Write {
        /// The compression being written.
        compression: Compression,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The deflate engine reported an error (should not happen on valid settings).
    #[error("deflate failed on block {block}")]
    Deflate {
        /// Block index.
        block: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A worker thread died.
    #[error("a gzip worker thread stopped unexpectedly")]
    Worker,
    /// A compression format kiln does not read.
    #[error(
        "the blob is `{format}`-compressed, which kiln does not read\n\nhint: use gzip, zstd or an uncompressed tar"
    )]
    UnsupportedFormat {
        /// `xz`, `bzip2`.
        format: &'static str,
    },
    /// An unknown name for a compression.
    #[error("unknown compression `{name}`\n\nhint: use `none`, `gzip` or `zstd`")]
    UnknownName {
        /// What was given.
        name: String,
    },
}

/// Compress `input` into `out`; returns the bytes written. See the module docs.
pub fn compress<R: Read, W: Write>(
    input: R,
    mut out: W,
    c: Compression,
    threads: usize,
) -> Result<u64, CompressError> {
    let write_err = |source| CompressError::Write {
        compression: c,
        source,
    };
    match c {
        Compression::None => {
            let mut counting = CountingWriter {
                inner: &mut out,
                count: 0,
            };
            copy(input, &mut counting, c)?;
            let n = counting.count;
            out.flush().map_err(write_err)?;
            Ok(n)
        }
        Compression::Zstd => {
            let mut counting = CountingWriter {
                inner: &mut out,
                count: 0,
            };
            let mut enc =
                zstd::stream::write::Encoder::new(&mut counting, ZSTD_LEVEL).map_err(write_err)?;
            copy(input, &mut enc, c)?;
            enc.finish().map_err(write_err)?;
            let n = counting.count;
            out.flush().map_err(write_err)?;
            Ok(n)
        }
        Compression::Gzip => gzip_parallel(input, out, threads.clamp(1, MAX_THREADS)),
    }
}

fn copy<R: Read, W: Write>(
    mut input: R,
    out: &mut W,
    c: Compression,
) -> Result<u64, CompressError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(CompressError::Read {
                    what: "uncompressed",
                    source,
                });
            }
        };
        out.write_all(&buf[..n])
            .map_err(|source| CompressError::Write {
                compression: c,
                source,
            })?;
        total += n as u64;
    }
}

#[derive(Debug)]
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Fill `buf` from `input` as far as possible; returns bytes read (short only at EOF).
fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> Result<usize, CompressError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(CompressError::Read {
                    what: "uncompressed",
                    source,
                });
            }
        }
    }
    Ok(got)
}

struct Job {
    index: u64,
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
}

struct Done {
    index: u64,
    out: Result<Vec<u8>, CompressError>,
    crc: u32,
    len: usize,
}

/// Compress one block as raw deflate with `dict` as history; the last block finishes the
/// stream, the others end with a sync flush.
fn deflate_block(
    index: u64,
    data: &[u8],
    dict: &[u8],
    last: bool,
) -> Result<Vec<u8>, CompressError> {
    let err = |source| CompressError::Deflate {
        block: index,
        source,
    };
    let mut c = Compress::new(flate2::Compression::new(GZIP_LEVEL), false);
    if !dict.is_empty() {
        c.set_dictionary(dict)
            .map_err(|e| err(io::Error::other(e)))?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = c.total_in() as usize;
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(|e| err(io::Error::other(e)))?;
        let done_input = c.total_in() as usize == data.len();
        match status {
            Status::StreamEnd => break,
            // A sync flush is complete once all input is in and room was left over.
            Status::Ok | Status::BufError if !last && done_input && out.capacity() > out.len() => {
                break;
            }
            Status::Ok | Status::BufError => {}
        }
    }
    Ok(out)
}

fn gzip_worker(jobs: &Arc<Mutex<mpsc::Receiver<Job>>>, done: &mpsc::Sender<Done>) {
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let crc = zlib_rs::crc32::crc32(0, &job.data);
        let out = deflate_block(job.index, &job.data, &job.dict, job.last);
        if done
            .send(Done {
                index: job.index,
                out,
                crc,
                len: job.data.len(),
            })
            .is_err()
        {
            return;
        }
    }
}

const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];

fn gzip_parallel<R: Read, W: Write>(
    mut input: R,
    mut out: W,
    threads: usize,
) -> Result<u64, CompressError> {
    let write_err = |source| CompressError::Write {
        compression: Compression::Gzip,
        source,
    };
    out.write_all(&GZIP_HEADER).map_err(write_err)?;
    let mut written = GZIP_HEADER.len() as u64;
    let mut crc = 0u32;
    let mut total_len = 0u64;

    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let job_rx = Arc::new(Mutex::new(job_rx));

    std::thread::scope(|s| -> Result<(), CompressError> {
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            s.spawn(move || gzip_worker(&rx, &tx));
        }
        drop(done_tx);

        let max_in_flight = (2 * threads) as u64;
        let mut next_to_write = 0u64;
        let mut submitted = 0u64;
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        // One block of lookahead tells whether the current block is the last.
        let mut cur = vec![0u8; GZIP_BLOCK];
        let mut cur_len = read_full(&mut input, &mut cur)?;
        cur.truncate(cur_len);
        let mut dict: Vec<u8> = Vec::new();
        let mut finished_input = false;

        let result = (|| -> Result<(), CompressError> {
            loop {
                // Submit while there is room.
                while !finished_input && submitted - next_to_write < max_in_flight {
                    let mut next = vec![0u8; GZIP_BLOCK];
                    let next_len = if cur_len == GZIP_BLOCK {
                        read_full(&mut input, &mut next)?
                    } else {
                        0
                    };
                    next.truncate(next_len);
                    let last = next_len == 0;
                    let new_dict = cur[cur.len().saturating_sub(WINDOW)..].to_vec();
                    let job = Job {
                        index: submitted,
                        data: std::mem::replace(&mut cur, next),
                        dict: std::mem::replace(&mut dict, new_dict),
                        last,
                    };
                    cur_len = next_len;
                    job_tx.send(job).map_err(|_| CompressError::Worker)?;
                    submitted += 1;
                    if last {
                        finished_input = true;
                    }
                }
                if next_to_write == submitted {
                    return Ok(());
                }
                // Wait for the next block in order.
                while !pending.contains_key(&next_to_write) {
                    let d = done_rx.recv().map_err(|_| CompressError::Worker)?;
                    pending.insert(d.index, d);
                }
                if let Some(d) = pending.remove(&next_to_write) {
                    let bytes = d.out?;
                    out.write_all(&bytes).map_err(write_err)?;
                    written += bytes.len() as u64;
                    crc = zlib_rs::crc32::crc32_combine(crc, d.crc, d.len as u64);
                    total_len += d.len as u64;
                    next_to_write += 1;
                }
            }
        })();
        drop(job_tx);
        result
    })?;

    let mut trailer = [0u8; 8];
    trailer[..4].copy_from_slice(&crc.to_le_bytes());
    trailer[4..].copy_from_slice(&(total_len as u32).to_le_bytes());
    out.write_all(&trailer).map_err(write_err)?;
    out.flush().map_err(write_err)?;
    Ok(written + 8)
}

/// Wrap `input` in a streaming decompressor chosen by its first bytes.
pub fn decompress<R: Read + 'static>(mut input: R) -> Result<Box<dyn Read>, CompressError> {
    let mut magic = [0u8; 6];
    let mut got = 0;
    while got < magic.len() {
        match input.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(CompressError::Read {
                    what: "compressed",
                    source,
                });
            }
        }
    }
    let head = magic[..got].to_vec();
    let chained = io::Cursor::new(head).chain(input);
    let m = &magic[..got];
    if m.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(chained)))
    } else if m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let dec =
            zstd::stream::read::Decoder::new(chained).map_err(|source| CompressError::Read {
                what: "compressed",
                source,
            })?;
        Ok(Box::new(dec))
    } else if m.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err(CompressError::UnsupportedFormat { format: "xz" })
    } else if m.starts_with(b"BZh") {
        Err(CompressError::UnsupportedFormat { format: "bzip2" })
    } else {
        Ok(Box::new(chained))
    }
}

/// Sniff the compression of a blob from its first bytes (`None` for anything unknown).
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}
