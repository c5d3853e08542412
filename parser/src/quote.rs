//! Go's `strconv.Quote`, which BuildKit's `Node.Dump()` uses for every
//! argument and flag.

/// Quotes `s` as Go's `strconv.Quote` does.
///
/// Go decides "printable" with its Unicode tables (`unicode.IsPrint`); Rust's
/// standard library has no category tables, so non-ASCII characters are
/// treated as printable unless they are control characters, whitespace other
/// than the ASCII space, or one of the common format/private/noncharacter
/// code points listed in [`is_go_unprintable`]. ASCII, which is all that
/// real Dockerfiles use in practice, is handled exactly.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_ascii() => out.push(c),
            c if is_go_unprintable(c) => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Non-ASCII characters that Go's `unicode.IsPrint` rejects (an
/// approximation: C0/C1 controls, non-ASCII spaces, common format
/// characters, private use areas and noncharacters).
fn is_go_unprintable(c: char) -> bool {
    let u = c as u32;
    c.is_control()
        || c.is_whitespace()
        || matches!(u, 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e)
        || matches!(u, 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x206f)
        || matches!(u, 0xfeff | 0xfff9..=0xfffb | 0xe000..=0xf8ff)
        || matches!(u, 0xf0000..=0x10ffff | 0xe0001 | 0xe0020..=0xe007f)
        || (u & 0xfffe) == 0xfffe
        || (0xfdd0..=0xfdef).contains(&u)
}

#[cfg(test)]
mod tests {
    use super::go_quote;

    #[test]
    fn quotes_like_go() {
        assert_eq!(go_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(go_quote("\0\u{1}\t\u{7f}"), r#""\x00\x01\t\x7f""#);
        assert_eq!(go_quote("♥"), "\"♥\"");
        assert_eq!(go_quote("\u{a0}"), r#""\u00a0""#);
        assert_eq!(go_quote("\u{10ffff}"), r#""\U0010ffff""#);
    }
}
