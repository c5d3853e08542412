//! Image references, normalized the way docker does.
//!
//! `busybox` → `docker.io/library/busybox:latest`,
//! `me/app:1` → `docker.io/me/app:1`, `localhost:5000/app` →
//! `localhost:5000/app:latest`. [`Reference::short`] undoes the
//! `docker.io/library/` prefix for display, as `docker images` does.

use std::fmt;

use crate::error::StoreError;

/// A normalized `domain/path:tag` image name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    repository: String,
    tag: String,
}

const DEFAULT_DOMAIN: &str = "docker.io";

impl Reference {
    /// Parses and normalizes a name. A digest part (`@sha256:...`) is
    /// refused: names in the store are tags.
    pub fn parse(input: &str) -> Result<Reference, StoreError> {
        let bad = |reason| StoreError::InvalidReference {
            reference: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(bad("a reference cannot be empty"));
        }
        if input.contains('@') {
            return Err(bad("digest references are not supported here; use a tag"));
        }
        // The tag is after the last `:` that comes after the last `/`.
        let last_slash = input.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match input[last_slash..].rfind(':') {
            Some(i) => (&input[..last_slash + i], &input[last_slash + i + 1..]),
            None => (input, "latest"),
        };
        if tag.is_empty()
            || tag.len() > 128
            || !tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            || tag.starts_with(['.', '-'])
        {
            return Err(bad(
                "a tag has up to 128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`",
            ));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DEFAULT_DOMAIN.to_owned(), name.to_owned()),
        };
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        {
            return Err(bad("the registry host is malformed"));
        }
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if path.is_empty() || path.split('/').any(|c| !valid_path_component(c)) {
            return Err(bad(
                "a repository path is lowercase letters, digits and `._-` separators, split by `/`",
            ));
        }
        let repository = format!("{domain}/{path}");
        if repository.len() > 255 {
            return Err(bad("a repository name is at most 255 characters"));
        }
        Ok(Reference {
            repository,
            tag: tag.to_owned(),
        })
    }

    /// The full repository, e.g. `docker.io/library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, e.g. `latest`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The repository as docker shows it: `busybox`, `me/app`,
    /// `quay.io/x/y`.
    pub fn short_repository(&self) -> &str {
        self.repository
            .strip_prefix("docker.io/library/")
            .or_else(|| self.repository.strip_prefix("docker.io/"))
            .unwrap_or(&self.repository)
    }

    /// `short_repository:tag`, the form docker prints in `RepoTags`.
    pub fn short(&self) -> String {
        format!("{}:{}", self.short_repository(), self.tag)
    }
}

/// A stored name (`docker.io/library/busybox@sha256:..`) as docker prints
/// it (`busybox@sha256:..`).
pub fn short_name(full: &str) -> &str {
    full.strip_prefix("docker.io/library/")
        .or_else(|| full.strip_prefix("docker.io/"))
        .unwrap_or(full)
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
        && b.iter().all(|&x| {
            x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-')
        })
        && !c.contains("..")
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.repository, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() {
        let cases = [
            (
                "busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "busybox:1.36",
                "docker.io/library/busybox:1.36",
                "busybox:1.36",
            ),
            ("me/app:v1", "docker.io/me/app:v1", "me/app:v1"),
            (
                "docker.io/library/x",
                "docker.io/library/x:latest",
                "x:latest",
            ),
            (
                "localhost:5000/app",
                "localhost:5000/app:latest",
                "localhost:5000/app:latest",
            ),
            ("localhost/app:t", "localhost/app:t", "localhost/app:t"),
            ("quay.io/a/b/c:d", "quay.io/a/b/c:d", "quay.io/a/b/c:d"),
        ];
        for (input, full, short) in cases {
            let r = Reference::parse(input).expect(input);
            assert_eq!(r.to_string(), full, "{input}");
            assert_eq!(r.short(), short, "{input}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "Busybox",
            "a:",
            "a:-x",
            "a/../b",
            "a@sha256:00",
            "a//b",
            "-a",
            "a b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(input in "\\PC{0,80}") {
            if let Ok(r) = Reference::parse(&input) {
                let again = Reference::parse(&r.to_string()).expect("normalized form parses");
                proptest::prop_assert_eq!(&again, &r);
                let short = Reference::parse(&r.short()).expect("short form parses");
                proptest::prop_assert_eq!(short, r);
            }
        }

        #[test]
        fn plausible_names_round_trip(
            host in proptest::option::of("[a-z]{1,8}\\.[a-z]{2,3}(:[0-9]{2,5})?"),
            path in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}",
            tag in proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}"),
        ) {
            let mut s = host.map(|h| format!("{h}/")).unwrap_or_default() + &path;
            if let Some(t) = &tag { s = format!("{s}:{t}"); }
            let r = Reference::parse(&s).expect("valid name");
            proptest::prop_assert_eq!(r.tag(), tag.as_deref().unwrap_or("latest"));
            proptest::prop_assert_eq!(Reference::parse(&r.short()).expect("short"), r);
        }
    }
}
