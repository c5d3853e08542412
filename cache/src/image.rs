//! The image model: what the store keeps about an image.

use oci_spec::image::ImageConfiguration;

use crate::digest::Digest;
use crate::error::StoreError;
use crate::reference::Reference;
use crate::validate::{DocumentKind, validate_document};

/// A layer as the store keeps it: uncompressed, named by its diffID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// sha256 of the uncompressed tar (also its blob's name).
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub size: u64,
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image id: its config's digest.
    pub id: Digest,
    /// Digest of the stored manifest (over uncompressed layers).
    pub manifest: Digest,
    /// Its names, sorted.
    pub names: Vec<Reference>,
    /// The registry digests it was pulled by (`domain/path@sha256:..`),
    /// sorted.
    pub repo_digests: Vec<String>,
    /// The decoded config.
    pub config: ImageConfiguration,
    /// The config exactly as stored (its sha256 is `id`).
    pub config_bytes: Vec<u8>,
    /// Layers, bottom first.
    pub layers: Vec<LayerInfo>,
    /// Unix time it entered the store.
    pub created: i64,
    /// Sum of the uncompressed layer sizes.
    pub size: u64,
}

/// A row of `kiln images`.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    /// The image id.
    pub id: Digest,
    /// Its names, sorted.
    pub names: Vec<Reference>,
    /// The config's `created`, if it has one.
    pub config_created: Option<String>,
    /// Sum of the uncompressed layer sizes.
    pub size: u64,
    /// Unix time it entered the store.
    pub created: i64,
}

/// Validates and decodes an image config.
pub fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfiguration, StoreError> {
    validate_document(DocumentKind::Config, bytes, what)?;
    serde_json::from_slice(bytes).map_err(|e| StoreError::InvalidDocument {
        kind: "config",
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses an RFC 3339 date-time (`2024-01-02T03:04:05.123Z`,
/// `...+02:00`) into unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return None;
            }
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let o = oh * 3600 + om * 60;
            if rb[0] == b'-' { -o } else { o }
        }
    };
    // days from civil (Howard Hinnant's algorithm)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

/// Formats unix seconds as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
pub fn format_rfc3339(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2015-10-31T22:22:56.015925234Z"),
            Some(1_446_330_176)
        );
        assert_eq!(
            parse_rfc3339("2015-10-31T23:22:56+01:00"),
            Some(1_446_330_176)
        );
        assert_eq!(parse_rfc3339("2015-10-31"), None);
        assert_eq!(parse_rfc3339("2015-13-31T22:22:56Z"), None);
        for t in [0, 1_446_330_176, 1_700_000_000, 951_782_400] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
    }
}
