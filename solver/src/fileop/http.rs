//! ADD of an `http(s)://` URL, as BuildKit's http source: the file is named
//! after the last segment of the URL path (`__unnamed__` when there is
//! none), has mode 0600 and the mtime of a `Last-Modified` header; a
//! `--checksum` is verified before anything reaches the destination.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use filetime::FileTime;
use sha2::Digest;

use super::FileOpError;

/// A `--checksum` value: algorithm and expected hex digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    algo: &'static str,
    hex: String,
}

fn parse_checksum(value: &str) -> Result<Expected, FileOpError> {
    let bad = || FileOpError::BadChecksum {
        value: value.to_owned(),
    };
    let (algo, hex) = value.split_once(':').ok_or_else(bad)?;
    let (algo, len) = match algo {
        "sha256" => ("sha256", 64),
        "sha384" => ("sha384", 96),
        "sha512" => ("sha512", 128),
        _ => return Err(bad()),
    };
    if hex.len() != len
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(bad());
    }
    Ok(Expected {
        algo,
        hex: hex.to_owned(),
    })
}

enum Hasher {
    S256(sha2::Sha256),
    S384(sha2::Sha384),
    S512(sha2::Sha512),
}

impl Hasher {
    fn new(algo: &str) -> Hasher {
        match algo {
            "sha384" => Hasher::S384(sha2::Sha384::new()),
            "sha512" => Hasher::S512(sha2::Sha512::new()),
            _ => Hasher::S256(sha2::Sha256::new()),
        }
    }
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::S256(h) => h.update(data),
            Hasher::S384(h) => h.update(data),
            Hasher::S512(h) => h.update(data),
        }
    }
    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::S256(h) => h.finalize().to_vec(),
            Hasher::S384(h) => h.finalize().to_vec(),
            Hasher::S512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The file name BuildKit gives a URL's content.
pub(super) fn file_name(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let path = match after_scheme.find('/') {
        Some(i) => &after_scheme[i..],
        None => "",
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(n) if !n.is_empty() && n != "." && n != ".." => n.to_owned(),
        _ => "__unnamed__".to_owned(),
    }
}

/// Download `url` into `dir`; returns the file and its name. With a
/// checksum, a mismatch is an error and the file is removed.
pub(super) fn download(
    url: &str,
    dir: &Path,
    checksum: Option<&str>,
    created_time: Option<SystemTime>,
) -> Result<(PathBuf, String), FileOpError> {
    let expected = checksum.map(parse_checksum).transpose()?;
    let name = file_name(url);
    let path = dir.join(&name);
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let mut resp = agent.get(url).call().map_err(|e| FileOpError::Http {
        url: url.to_owned(),
        source: Box::new(e),
    })?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(FileOpError::HttpStatus {
            url: url.to_owned(),
            status,
        });
    }
    let last_modified = resp
        .headers()
        .get("last-modified")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date);
    let mut hasher = Hasher::new(expected.as_ref().map_or("sha256", |e| e.algo));
    let mut out = fs_err::File::create(&path)?;
    let mut body = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    drop(out);
    let actual = hasher.hex();
    if let Some(exp) = expected
        && exp.hex != actual
    {
        fs_err::remove_file(&path)?;
        return Err(FileOpError::ChecksumMismatch {
            url: url.to_owned(),
            expected: format!("{}:{}", exp.algo, exp.hex),
            actual: format!("{}:{actual}", exp.algo),
        });
    }
    fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let mtime = created_time.or(last_modified);
    if let Some(t) = mtime {
        let t = FileTime::from_system_time(t);
        filetime::set_file_times(&path, t, t)?;
    }
    Ok((path, name))
}

/// RFC 7231's IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 || hms[0] > 23 || hms[1] > 59 || hms[2] > 60 || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(file_name("http://h/a/b.tar.gz"), "b.tar.gz");
        assert_eq!(file_name("https://h/a/b?x=1#f"), "b");
        assert_eq!(file_name("http://h/"), "__unnamed__");
        assert_eq!(file_name("http://h"), "__unnamed__");
        assert_eq!(file_name("http://h/dir/"), "dir");
    }

    #[test]
    fn http_dates() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert!(parse_http_date("yesterday").is_none());
    }

    #[test]
    fn checksums() {
        assert!(parse_checksum(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(parse_checksum("sha256:abc").is_err());
        assert!(parse_checksum(&format!("md5:{}", "a".repeat(32))).is_err());
        assert!(parse_checksum(&format!("sha256:{}", "A".repeat(64))).is_err());
    }
}
