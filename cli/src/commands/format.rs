//! Docker-style rendering of sizes and ages.

/// `4.26MB`, `1.2kB`, `0B`: decimal units, 3 significant digits, as
/// docker's `units.HumanSize`.
pub(crate) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    // `%.3g`: three significant digits, trailing zeros dropped.
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let mut s = format!("{v:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    format!("{s}{}", UNITS[i])
}

/// `2 hours ago`, as docker's `units.HumanDuration` + " ago".
pub(crate) fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    let m = s / 60;
    let h = (s as f64 / 3600.0).round() as i64;
    let d = if s < 1 {
        "Less than a second".to_owned()
    } else if s == 1 {
        "1 second".to_owned()
    } else if s < 60 {
        format!("{s} seconds")
    } else if m == 1 {
        "About a minute".to_owned()
    } else if m < 60 {
        format!("{m} minutes")
    } else if h == 1 {
        "About an hour".to_owned()
    } else if h < 48 {
        format!("{h} hours")
    } else if h < 24 * 7 * 2 {
        format!("{} days", h / 24)
    } else if h < 24 * 30 * 2 {
        format!("{} weeks", h / 24 / 7)
    } else if h < 24 * 365 * 2 {
        format!("{} months", h / 24 / 30)
    } else {
        format!("{} years", h / 24 / 365)
    };
    format!("{d} ago")
}

/// Prints rows as left-aligned columns separated by 3 spaces.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1200), "1.2kB");
        assert_eq!(human_size(4_261_000), "4.26MB");
        assert_eq!(human_size(524_288_000), "524MB");
        assert_eq!(human_size(10_000_000), "10MB");
    }

    #[test]
    fn ages_like_docker() {
        assert_eq!(human_age(0), "Less than a second ago");
        assert_eq!(human_age(30), "30 seconds ago");
        assert_eq!(human_age(90), "About a minute ago");
        assert_eq!(human_age(7200), "2 hours ago");
        assert_eq!(human_age(3 * 86400), "3 days ago");
        assert_eq!(human_age(800 * 86400), "2 years ago");
    }
}
