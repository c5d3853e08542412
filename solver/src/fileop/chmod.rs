//! `--chmod`: octal (`0755`) or symbolic (`u+x,g-w`, `+x`, `a=rX`) as
//! BuildKit (dockerfile 1.14+, `dchapes/mode`) applies it to every copied
//! file and directory (never to symlinks).

use super::FileOpError;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;

/// A parsed `--chmod` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeChange {
    /// An absolute octal mode (`0o7777` at most).
    Octal(u32),
    /// chmod(1) clauses, applied left to right.
    Symbolic(Vec<Clause>),
}

/// One `who op perms` step of a symbolic mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    who: u32,
    op: u8,
    perm: Perm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Perm {
    /// Letters from `rwxXst`.
    Bits {
        rwx: u32,
        big_x: bool,
        s: bool,
        t: bool,
    },
    /// `u`, `g` or `o`: copy that class's current bits.
    Copy(u8),
}

impl ModeChange {
    /// Parse a `--chmod` value as BuildKit does: octal first, else symbolic.
    ///
    /// ```
    /// use kiln_solver::fileop::ModeChange;
    /// let m = ModeChange::parse("u+x,g-w").unwrap();
    /// assert_eq!(m.apply(0o664, false), 0o744);
    /// assert_eq!(ModeChange::parse("0640").unwrap().apply(0o777, false), 0o640);
    /// assert_eq!(ModeChange::parse("a=rX").unwrap().apply(0o700, true), 0o555);
    /// ```
    pub fn parse(value: &str) -> Result<ModeChange, FileOpError> {
        let bad = || FileOpError::BadChmod {
            value: value.to_owned(),
        };
        if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
            let m = u32::from_str_radix(value, 8).map_err(|_| bad())?;
            if m > 0o7777 {
                return Err(bad());
            }
            return Ok(ModeChange::Octal(m));
        }
        let mut clauses = Vec::new();
        for part in value.split(',') {
            let b = part.as_bytes();
            let mut i = 0;
            let mut who = 0u32;
            while i < b.len() {
                match b[i] {
                    b'u' => who |= 0o4700 | S_ISUID,
                    b'g' => who |= 0o2070 | S_ISGID,
                    b'o' => who |= 0o1007,
                    b'a' => who |= 0o7777,
                    _ => break,
                }
                i += 1;
            }
            if who == 0 {
                who = 0o7777;
            }
            if i >= b.len() {
                return Err(bad());
            }
            while i < b.len() {
                let op = b[i];
                if !matches!(op, b'+' | b'-' | b'=') {
                    return Err(bad());
                }
                i += 1;
                let perm = if i < b.len() && matches!(b[i], b'u' | b'g' | b'o') {
                    i += 1;
                    Perm::Copy(b[i - 1])
                } else {
                    let (mut rwx, mut big_x, mut s, mut t) = (0u32, false, false, false);
                    while i < b.len() && !matches!(b[i], b'+' | b'-' | b'=') {
                        match b[i] {
                            b'r' => rwx |= 0o444,
                            b'w' => rwx |= 0o222,
                            b'x' => rwx |= 0o111,
                            b'X' => big_x = true,
                            b's' => s = true,
                            b't' => t = true,
                            _ => return Err(bad()),
                        }
                        i += 1;
                    }
                    Perm::Bits { rwx, big_x, s, t }
                };
                clauses.push(Clause { who, op, perm });
            }
        }
        if clauses.is_empty() {
            return Err(bad());
        }
        Ok(ModeChange::Symbolic(clauses))
    }

    /// The new permission bits (`0o7777` part) for an entry whose current
    /// bits are `mode`.
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            ModeChange::Octal(m) => return *m,
            ModeChange::Symbolic(c) => c,
        };
        let mut m = mode & 0o7777;
        for c in clauses {
            let bits = match c.perm {
                Perm::Bits { rwx, big_x, s, t } => {
                    let mut bits = rwx;
                    if big_x && (is_dir || m & 0o111 != 0) {
                        bits |= 0o111;
                    }
                    if s {
                        bits |= S_ISUID | S_ISGID;
                    }
                    if t {
                        bits |= S_ISVTX;
                    }
                    bits
                }
                Perm::Copy(from) => {
                    let v = match from {
                        b'u' => (m >> 6) & 7,
                        b'g' => (m >> 3) & 7,
                        _ => m & 7,
                    };
                    v * 0o111
                }
            };
            let bits = bits & c.who;
            match c.op {
                b'+' => m |= bits,
                b'-' => m &= !bits,
                _ => {
                    // `=` clears what the classes named may hold, then sets.
                    let clear = c.who & !(if c.who & 0o7 == 0 { S_ISVTX } else { 0 });
                    m = (m & !clear) | bits;
                }
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str, mode: u32, dir: bool) -> u32 {
        ModeChange::parse(s).unwrap().apply(mode, dir)
    }

    #[test]
    fn octal() {
        assert_eq!(ModeChange::parse("755").unwrap(), ModeChange::Octal(0o755));
        assert_eq!(
            ModeChange::parse("04755").unwrap(),
            ModeChange::Octal(0o4755)
        );
        assert!(ModeChange::parse("10000").is_err());
        assert!(ModeChange::parse("0789").is_err());
        assert!(ModeChange::parse("").is_err());
    }

    #[test]
    fn symbolic() {
        assert_eq!(sym("+x", 0o644, false), 0o755);
        assert_eq!(sym("u+x", 0o644, false), 0o744);
        assert_eq!(sym("g-w", 0o664, false), 0o644);
        assert_eq!(sym("u+x,g-w", 0o664, false), 0o744);
        assert_eq!(sym("go=", 0o777, false), 0o700);
        assert_eq!(sym("a=r", 0o777, false), 0o444);
        assert_eq!(sym("o=u", 0o640, false), 0o646);
        assert_eq!(sym("a+X", 0o644, false), 0o644);
        assert_eq!(sym("a+X", 0o744, false), 0o755);
        assert_eq!(sym("a+X", 0o644, true), 0o755);
        assert_eq!(sym("u+s", 0o755, false), 0o4755);
        assert_eq!(sym("g+s", 0o755, false), 0o2755);
        assert_eq!(sym("+t", 0o755, true), 0o1755);
        assert_eq!(sym("u=rwx,g=rx,o=", 0o000, false), 0o750);
        assert_eq!(sym("u+r-w", 0o200, false), 0o400);
    }

    #[test]
    fn symbolic_errors() {
        for bad in ["u", "u+q", "x+", "ug", ",", "u+x,", "+x,g"] {
            assert!(ModeChange::parse(bad).is_err(), "{bad}");
        }
    }
}
