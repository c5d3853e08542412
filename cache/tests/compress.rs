//! Compression: parallel gzip is byte-identical for any thread count and readable by real
//! `gzip`; decompression sniffs the format and streams.

mod layer_common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use kiln_cache::compress::{CompressError, Compression, GZIP_BLOCK, compress, decompress, detect};

/// Deterministic, partly compressible data: text-like runs mixed with pseudo-random bytes.
fn sample(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x: u32 = 12345;
    while v.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        if x.is_multiple_of(3) {
            v.extend_from_slice(b"the quick brown fox jumps over the lazy layer ");
        } else {
            v.extend_from_slice(&x.to_le_bytes());
        }
    }
    v.truncate(len);
    v
}

fn gz(data: &[u8], threads: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let n = compress(data, &mut out, Compression::Gzip, threads).expect("compress");
    assert_eq!(n, out.len() as u64, "compress returns the bytes written");
    out
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

#[test]
fn parallel_gzip_is_identical_for_1_2_4_threads() {
    for len in [
        0,
        1,
        100,
        GZIP_BLOCK - 1,
        GZIP_BLOCK,
        GZIP_BLOCK + 1,
        3 * GZIP_BLOCK + 12345,
    ] {
        let data = sample(len);
        let one = gz(&data, 1);
        assert_eq!(one, gz(&data, 2), "len {len}: 2 threads differ");
        assert_eq!(one, gz(&data, 4), "len {len}: 4 threads differ");
        // GzDecoder (not MultiGz) reads only the first member: all data must be in it.
        assert_eq!(gunzip(&one), data, "len {len}: round trip");
    }
}

#[test]
fn parallel_gzip_compresses_close_to_single_stream() {
    let data = sample(4 * GZIP_BLOCK);
    let ours = gz(&data, 2).len();
    let mut single = Vec::new();
    let mut enc = flate2::write::GzEncoder::new(&mut single, flate2::Compression::new(6));
    enc.write_all(&data).unwrap();
    enc.finish().unwrap();
    assert!(
        ours < single.len() + single.len() / 50,
        "ours {ours} vs single-stream {}",
        single.len()
    );
}

#[test]
fn real_gzip_reads_parallel_gzip() {
    if !layer_common::require_tool("real_gzip_reads_parallel_gzip", "gzip") {
        return;
    }
    let data = sample(2 * GZIP_BLOCK + 777);
    let compressed = gz(&data, 2);
    let mut child = Command::new("gzip")
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&compressed));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "gzip -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, data);
    // `gzip -t` also checks the CRC and length trailer.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.gz");
    fs_err::write(&f, gz(&data, 4)).unwrap();
    assert!(
        Command::new("gzip")
            .arg("-t")
            .arg(&f)
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn zstd_round_trips_and_real_zstd_reads_it() {
    let data = sample(GZIP_BLOCK + 5);
    let mut out = Vec::new();
    compress(&data[..], &mut out, Compression::Zstd, 2).unwrap();
    assert_eq!(detect(&out), Compression::Zstd);
    let mut back = Vec::new();
    decompress(std::io::Cursor::new(out.clone()))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);
    if layer_common::require_tool("zstd_round_trips_and_real_zstd_reads_it", "zstd") {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.zst");
        fs_err::write(&f, &out).unwrap();
        let o = Command::new("zstd")
            .args(["-d", "-c"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(o.status.success());
        assert_eq!(o.stdout, data);
    }
}

#[test]
fn decompress_sniffs_gzip_zstd_and_plain() {
    let data = sample(10_000);
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let mut out = Vec::new();
        compress(&data[..], &mut out, c, 1).unwrap();
        let mut back = Vec::new();
        decompress(std::io::Cursor::new(out))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data, "{c}");
    }
    // Tiny inputs (shorter than any magic) pass through.
    let mut back = Vec::new();
    decompress(std::io::Cursor::new(b"a".to_vec()))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, b"a");
}

#[test]
fn decompress_reads_multi_member_gzip() {
    let mut two = gz(b"first ", 1);
    two.extend_from_slice(&gz(b"second", 1));
    let mut back = Vec::new();
    decompress(std::io::Cursor::new(two))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, b"first second");
}

#[test]
fn decompress_refuses_xz_and_bzip2_and_reports_corruption() {
    let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0];
    assert!(matches!(
        decompress(std::io::Cursor::new(xz.to_vec())),
        Err(CompressError::UnsupportedFormat { format: "xz" })
    ));
    assert!(matches!(
        decompress(std::io::Cursor::new(b"BZh91AY".to_vec())),
        Err(CompressError::UnsupportedFormat { format: "bzip2" })
    ));
    let mut bad = gz(&sample(50_000), 1);
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let mut sink = Vec::new();
    let res = decompress(std::io::Cursor::new(bad))
        .unwrap()
        .read_to_end(&mut sink);
    assert!(
        res.is_err(),
        "a corrupted gzip stream is an error, not silent garbage"
    );
}

#[test]
fn compression_names_and_media_types() {
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
        assert_eq!(
            Compression::from_media_type(c.oci_layer_media_type()),
            Some(c)
        );
    }
    assert_eq!(Compression::Gzip.media_type_suffix(), "+gzip");
    assert_eq!(
        Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        Some(Compression::Gzip)
    );
    let e = "lz4".parse::<Compression>().unwrap_err();
    assert!(e.to_string().contains("`lz4`"));
}

#[test]
fn large_generated_input_round_trips_through_streaming_readers() {
    // 64 MiB from a generating reader, checked byte by byte while decompressing incrementally.
    // (Peak memory is measured by the benchmark, not here.)
    struct Gen(u64, u64);
    impl Read for Gen {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (buf.len() as u64).min(self.1 - self.0) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((self.0 + i as u64) % 251) as u8;
            }
            self.0 += n as u64;
            Ok(n)
        }
    }
    let total = 64 << 20;
    let mut out = Vec::new();
    compress(Gen(0, total), &mut out, Compression::Gzip, 2).unwrap();
    let mut d = decompress(std::io::Cursor::new(out)).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    loop {
        let n = d.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate() {
            assert_eq!(b, ((pos + i as u64) % 251) as u8);
        }
        pos += n as u64;
    }
    assert_eq!(pos, total);
}

/// Format-stability vector: parallel gzip bytes for a fixed input. A change (block size,
/// level, zlib-rs upgrade) changes every exported blob digest: change it only on purpose.
#[test]
fn parallel_gzip_output_is_stable() {
    use sha2::Digest as _;
    let out = gz(&sample(3 * GZIP_BLOCK + 999), 2);
    let digest: String = sha2::Sha256::digest(&out)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest,
        "571233b6131a6f5af1e1a30cab7c025e3b7e67a914333021dbdbb6cebbc847bb"
    );
}
