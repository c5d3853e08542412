//! Registry references: `host[:port]/repo[:tag][@digest]`, with docker's
//! defaults (`busybox` → `docker.io/library/busybox:latest`).

use std::fmt;

use super::RegistryError;
use crate::digest::Digest;
use crate::reference::Reference;

/// The registry docker.io names; its API lives at [`DOCKER_HUB_API`].
pub const DOCKER_HUB: &str = "docker.io";
/// The host serving Docker Hub's distribution API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// An image in a registry: registry host, repository, and a tag and/or a
/// digest (a digest wins when both are given, as in docker).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses and normalizes `[host[:port]/]path[:tag][@sha256:hex]`. With
    /// neither tag nor digest the tag is `latest`.
    pub fn parse(input: &str) -> Result<ImageRef, RegistryError> {
        let bad = |reason: String| RegistryError::InvalidReference {
            reference: input.to_owned(),
            reason,
        };
        let (name, digest) = match input.split_once('@') {
            Some((name, d)) => (
                name,
                Some(d.parse::<Digest>().map_err(|e| bad(e.to_string()))?),
            ),
            None => (input, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let explicit_tag = name[last_slash..].contains(':');
        let normalized = Reference::parse(name).map_err(|e| bad(e.to_string()))?;
        let (registry, repository) = normalized
            .repository()
            .split_once('/')
            .ok_or_else(|| bad("a repository needs a path".to_owned()))?;
        let tag = (explicit_tag || digest.is_none()).then(|| normalized.tag().to_owned());
        Ok(ImageRef {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// The same image from a store name.
    pub fn from_store_reference(r: &Reference) -> ImageRef {
        let (registry, repository) = r
            .repository()
            .split_once('/')
            .unwrap_or((DOCKER_HUB, r.repository()));
        ImageRef {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: Some(r.tag().to_owned()),
            digest: None,
        }
    }

    /// The registry as named: `docker.io`, `localhost:5000`, `quay.io`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host (and port) the distribution API is reached at
    /// (`registry-1.docker.io` for `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path in the registry, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was given (or defaulted).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if one was given.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What goes after `/manifests/`: the digest if any, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> ImageRef {
        ImageRef {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> ImageRef {
        ImageRef {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The store name (`registry/repository:tag`) when there is a tag.
    pub fn store_reference(&self) -> Option<Reference> {
        let tag = self.tag.as_deref()?;
        Reference::parse(&format!("{}/{}:{tag}", self.registry, self.repository)).ok()
    }

    /// `registry/repository@digest`, the store's key for a pinned image,
    /// when there is a digest.
    pub fn digest_name(&self) -> Option<String> {
        let d = self.digest.as_ref()?;
        Some(format!("{}/{}@{d}", self.registry, self.repository))
    }

    /// Whether the registry is this machine (`localhost`, `127.0.0.0/8`,
    /// `::1`): docker talks plain http to those when https fails.
    pub fn is_local(&self) -> bool {
        is_local_host(&self.registry)
    }
}

/// Whether a `host[:port]` names this machine.
pub fn is_local_host(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = format!("{}/{}", self.registry, self.repository);
        let short = name
            .strip_prefix("docker.io/library/")
            .or_else(|| name.strip_prefix("docker.io/"))
            .unwrap_or(&name);
        f.write_str(short)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_docker_defaults() {
        let r = ImageRef::parse("busybox").expect("parses");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.reference(), "latest");
        assert_eq!(r.to_string(), "busybox:latest");

        let r = ImageRef::parse("localhost:5000/a/b:v1").expect("parses");
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("v1"));
        assert!(r.is_local());
        assert_eq!(
            r.store_reference().expect("tag").to_string(),
            "localhost:5000/a/b:v1"
        );

        let hex = "a".repeat(64);
        let r = ImageRef::parse(&format!("quay.io/x/y@sha256:{hex}")).expect("parses");
        assert_eq!(r.tag(), None);
        assert_eq!(r.reference(), format!("sha256:{hex}"));
        assert!(r.store_reference().is_none());
        assert!(!r.is_local());
        let r = ImageRef::parse(&format!("127.0.0.1:5000/x:t@sha256:{hex}")).expect("parses");
        assert_eq!(r.tag(), Some("t"));
        assert_eq!(r.reference(), format!("sha256:{hex}"));
        assert!(r.is_local());
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "x/UPPER",
            "a@sha256:12",
            "a@md5:00",
            "a:-x",
            "host:5000/",
        ] {
            let err = ImageRef::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn local_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:1",
            "127.3.0.1",
            "[::1]:5000",
        ] {
            assert!(is_local_host(h), "{h}");
        }
        for h in ["docker.io", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_local_host(h), "{h}");
        }
    }
}
