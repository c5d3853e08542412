//! The JSON-array form of RUN/CMD/ENTRYPOINT/SHELL/COPY/ADD/VOLUME, decoded
//! the way BuildKit does it: Go's `encoding/json` `Decoder` reads exactly one
//! value and ignores whatever follows it, so `CMD ["a"] b` is the exec form
//! `["a"]`. Anything that is not valid JSON falls back to the shell form; a
//! valid array holding a non-string is an error.

/// What the text after an instruction's flags turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum JsonArray {
    /// A JSON array of strings, decoded.
    Strings(Vec<String>),
    /// Valid JSON array, but with an element that is not a string.
    NotStrings,
    /// Not JSON (or not an array): the caller uses the shell form.
    Invalid,
    /// JSON that ran into the end of the text (an unclosed string or
    /// array). BuildKit treats it as [`JsonArray::Invalid`]; kiln's typed
    /// layer reports it.
    Unterminated,
}

/// Go's `maxNestingDepth` in `encoding/json`'s scanner.
const MAX_DEPTH: usize = 10_000;

/// Parses `rest` (leading Unicode whitespace allowed) as BuildKit's
/// `parseJSON` does.
pub(crate) fn parse_json_array(rest: &str) -> JsonArray {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return JsonArray::Invalid;
    }
    let mut p = Parser {
        s: rest.as_bytes(),
        pos: 1,
        text: rest,
    };
    match p.array_of_strings() {
        Some(Some(v)) => JsonArray::Strings(v),
        Some(None) => JsonArray::NotStrings,
        None if p.pos >= p.s.len() => JsonArray::Unterminated,
        None => JsonArray::Invalid,
    }
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// `None`: syntax error. `Some(None)`: valid, but not all strings.
    fn array_of_strings(&mut self) -> Option<Option<Vec<String>>> {
        let mut out = Vec::new();
        let mut all_strings = true;
        self.ws();
        if self.peek() == Some(b']') {
            return Some(Some(out));
        }
        loop {
            self.ws();
            if self.peek() == Some(b'"') {
                out.push(self.string()?);
            } else {
                self.value(2)?;
                all_strings = false;
            }
            self.ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => break,
                _ => return None,
            }
        }
        Some(all_strings.then_some(out))
    }

    /// Validates any JSON value without recursion (depth is the nesting
    /// depth of the value about to start).
    fn value(&mut self, depth: usize) -> Option<()> {
        // Each entry: true = inside an object, false = inside an array.
        let mut stack: Vec<bool> = Vec::new();
        let base = depth - 1;
        loop {
            self.ws();
            // Parse one value start.
            match self.peek()? {
                b'[' | b'{' => {
                    let is_object = self.peek() == Some(b'{');
                    self.pos += 1;
                    if base + stack.len() + 1 > MAX_DEPTH {
                        return None;
                    }
                    stack.push(is_object);
                    self.ws();
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        stack.pop();
                    } else {
                        if is_object {
                            self.object_key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal("true")?,
                b'f' => self.literal("false")?,
                b'n' => self.literal("null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return None,
            }
            // After a complete value: close containers or continue.
            loop {
                let Some(&is_object) = stack.last() else {
                    return Some(());
                };
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.pos += 1;
                        if is_object {
                            self.ws();
                            self.object_key()?;
                        }
                        break;
                    }
                    b']' if !is_object => {
                        self.pos += 1;
                        stack.pop();
                    }
                    b'}' if is_object => {
                        self.pos += 1;
                        stack.pop();
                    }
                    _ => return None,
                }
            }
        }
    }

    fn object_key(&mut self) -> Option<()> {
        self.ws();
        if self.peek() != Some(b'"') {
            return None;
        }
        self.string()?;
        self.ws();
        if self.peek() != Some(b':') {
            return None;
        }
        self.pos += 1;
        Some(())
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        if self.s[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Some(())
        } else {
            None
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let h = self.s.get(at..at + 4)?;
        let mut v = 0u32;
        for &b in h {
            v = v * 16 + (b as char).to_digit(16)?;
        }
        Some(v)
    }

    /// Decodes a string starting at its opening quote, as Go does (lone
    /// surrogates become U+FFFD).
    fn string(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(self.text.get(start..self.pos)?);
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let e = self.peek()?;
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let r = self.hex4(self.pos)?;
                            self.pos += 4;
                            if (0xd800..0xe000).contains(&r) {
                                let low = if self.s[self.pos..].starts_with(b"\\u") {
                                    self.hex4(self.pos + 2)
                                } else {
                                    None
                                };
                                match low {
                                    Some(l) if r < 0xdc00 && (0xdc00..0xe000).contains(&l) => {
                                        let c = 0x10000 + ((r - 0xd800) << 10) + (l - 0xdc00);
                                        out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                                        self.pos += 6;
                                    }
                                    _ => out.push('\u{fffd}'),
                                }
                            } else {
                                out.push(char::from_u32(r).unwrap_or('\u{fffd}'));
                            }
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{JsonArray, parse_json_array};

    fn strings(v: &[&str]) -> JsonArray {
        JsonArray::Strings(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn go_decoder_semantics() {
        assert_eq!(parse_json_array(r#"["a", "b"]"#), strings(&["a", "b"]));
        assert_eq!(parse_json_array(r#"  [ ] trailing"#), strings(&[]));
        assert_eq!(parse_json_array(r#"["a"] b"#), strings(&["a"]));
        assert_eq!(
            parse_json_array(r#"["\u0000\ud83d\ude00\ud800x"]"#),
            strings(&["\0😀\u{fffd}x"])
        );
        assert_eq!(parse_json_array(r#"["a", ["b"]]"#), JsonArray::NotStrings);
        assert_eq!(
            parse_json_array(r#"[1, {"a": [true, null]}]"#),
            JsonArray::NotStrings
        );
        assert_eq!(parse_json_array(r#"['a']"#), JsonArray::Invalid);
        assert_eq!(parse_json_array(r#"["a""#), JsonArray::Unterminated);
        assert_eq!(parse_json_array(r#"["a", "b]"#), JsonArray::Unterminated);
        assert_eq!(parse_json_array(r#"[01]"#), JsonArray::Invalid);
        assert_eq!(parse_json_array(r#"["a\'"]"#), JsonArray::Invalid);
        assert_eq!(parse_json_array("[\"a\u{b}\"]"), JsonArray::Invalid);
        assert_eq!(parse_json_array("echo"), JsonArray::Invalid);
        let deep = format!("[{}{}]", "[".repeat(20_000), "]".repeat(20_000));
        assert_eq!(parse_json_array(&deep), JsonArray::Invalid);
    }
}
