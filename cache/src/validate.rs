//! Checks on OCI JSON documents beyond "it decodes".
//!
//! kiln's readers decode manifests, indexes, configs and layout headers
//! into oci-spec types and then apply the rules the image-spec's JSON
//! schemas and its Go validator apply: required fields and their JSON
//! types, media-type and digest grammar (go-digest: known algorithms must
//! have the right length of lowercase hex, others only the grammar),
//! sizes ≥ 0, `urls` are URIs, `data` is base64, `Env` entries are
//! `KEY=value`, `schemaVersion` is 2, a manifest has at least one layer.
//! Docker v2 schema 2 media types are accepted wherever the OCI ones are.

use serde_json::Value;

use crate::error::StoreError;

/// What kind of document to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    /// A content descriptor.
    Descriptor,
    /// An image manifest (OCI or Docker v2 schema 2).
    Manifest,
    /// An image index (or Docker manifest list).
    Index,
    /// An image config.
    Config,
    /// The `oci-layout` file.
    Layout,
}

impl DocumentKind {
    /// The kind a media type names, if kiln reads it.
    pub fn from_media_type(media_type: &str) -> Option<DocumentKind> {
        Some(match media_type {
            "application/vnd.oci.descriptor.v1+json" => DocumentKind::Descriptor,
            "application/vnd.oci.layout.header.v1+json" => DocumentKind::Layout,
            MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => DocumentKind::Manifest,
            MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => DocumentKind::Index,
            "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json" => DocumentKind::Config,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            DocumentKind::Descriptor => "descriptor",
            DocumentKind::Manifest => "manifest",
            DocumentKind::Index => "index",
            DocumentKind::Config => "config",
            DocumentKind::Layout => "oci-layout",
        }
    }
}

/// OCI image manifest media type.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest media type.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Validates `bytes` as a document of `kind`; `what` names it in errors.
pub fn validate_document(kind: DocumentKind, bytes: &[u8], what: &str) -> Result<(), StoreError> {
    let fail = |reason: String| StoreError::InvalidDocument {
        kind: kind.name(),
        what: what.to_owned(),
        reason,
    };
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let mut c = Checker { errors: Vec::new() };
    match kind {
        DocumentKind::Descriptor => c.descriptor(&v, "$"),
        DocumentKind::Manifest => c.manifest(&v),
        DocumentKind::Index => c.index(&v),
        DocumentKind::Config => c.config(&v),
        DocumentKind::Layout => c.layout(&v),
    }
    if let Some(first) = c.errors.into_iter().next() {
        return Err(fail(first));
    }
    // And it must decode into oci-spec's type.
    let decoded = match kind {
        DocumentKind::Descriptor => {
            serde_json::from_slice::<oci_spec::image::Descriptor>(bytes).map(drop)
        }
        DocumentKind::Manifest => {
            serde_json::from_slice::<oci_spec::image::ImageManifest>(bytes).map(drop)
        }
        DocumentKind::Index => {
            serde_json::from_slice::<oci_spec::image::ImageIndex>(bytes).map(drop)
        }
        DocumentKind::Config => {
            serde_json::from_slice::<oci_spec::image::ImageConfiguration>(bytes).map(drop)
        }
        DocumentKind::Layout => {
            serde_json::from_slice::<oci_spec::image::OciLayout>(bytes).map(drop)
        }
    };
    decoded.map_err(|e| fail(e.to_string()))
}

struct Checker {
    errors: Vec<String>,
}

impl Checker {
    fn err(&mut self, at: &str, msg: impl std::fmt::Display) {
        self.errors.push(format!("`{at}`: {msg}"));
    }

    fn object<'v>(&mut self, v: &'v Value, at: &str) -> Option<&'v serde_json::Map<String, Value>> {
        match v {
            Value::Object(o) => Some(o),
            _ => {
                self.err(at, "must be an object");
                None
            }
        }
    }

    fn string(&mut self, v: Option<&Value>, at: &str, required: bool) -> Option<String> {
        match v {
            None if required => {
                self.err(at, "is required");
                None
            }
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(at, "must be a string");
                None
            }
        }
    }

    fn string_array(&mut self, v: Option<&Value>, at: &str, nullable: bool) -> Option<Vec<String>> {
        match v {
            None => None,
            Some(Value::Null) if nullable => None,
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, x) in a.iter().enumerate() {
                    match x {
                        Value::String(s) => out.push(s.clone()),
                        _ => self.err(&format!("{at}[{i}]"), "must be a string"),
                    }
                }
                Some(out)
            }
            Some(_) => {
                self.err(at, "must be an array of strings");
                None
            }
        }
    }

    fn map_of(&mut self, v: Option<&Value>, at: &str, nullable: bool, values_are_strings: bool) {
        match v {
            None => {}
            Some(Value::Null) if nullable => {}
            Some(Value::Object(o)) => {
                for (k, x) in o {
                    let ok = if values_are_strings {
                        x.is_string()
                    } else {
                        x.is_object()
                    };
                    if !ok {
                        let want = if values_are_strings {
                            "a string"
                        } else {
                            "an object"
                        };
                        self.err(&format!("{at}.{k}"), format!("must be {want}"));
                    }
                }
            }
            Some(_) => self.err(at, "must be an object"),
        }
    }

    fn media_type(&mut self, v: Option<&Value>, at: &str, required: bool) -> Option<String> {
        let s = self.string(v, at, required)?;
        if !media_type_ok(&s) {
            self.err(at, format!("`{s}` is not a media type (`type/subtype`)"));
        }
        Some(s)
    }

    fn digest(&mut self, v: Option<&Value>, at: &str, required: bool) {
        if let Some(s) = self.string(v, at, required)
            && let Err(reason) = digest_ok(&s)
        {
            self.err(at, format!("`{s}` {reason}"));
        }
    }

    fn size(&mut self, v: Option<&Value>, at: &str) {
        match v {
            None => self.err(at, "is required"),
            Some(Value::Number(n)) if n.is_u64() => {}
            Some(Value::Number(n)) if n.is_i64() => self.err(at, "must not be negative"),
            Some(_) => self.err(at, "must be an integer"),
        }
    }

    fn schema_version(&mut self, v: Option<&Value>) {
        match v {
            Some(Value::Number(n)) if n.as_u64() == Some(2) => {}
            Some(_) => self.err("schemaVersion", "must be 2"),
            None => self.err("schemaVersion", "is required"),
        }
    }

    fn descriptor(&mut self, v: &Value, at: &str) {
        let Some(o) = self.object(v, at) else { return };
        self.media_type(o.get("mediaType"), &format!("{at}.mediaType"), true);
        self.size(o.get("size"), &format!("{at}.size"));
        self.digest(o.get("digest"), &format!("{at}.digest"), true);
        if let Some(urls) = self.string_array(o.get("urls"), &format!("{at}.urls"), false) {
            for u in urls {
                if !uri_ok(&u) {
                    self.err(&format!("{at}.urls"), format!("`{u}` is not a URI"));
                }
            }
        }
        self.map_of(
            o.get("annotations"),
            &format!("{at}.annotations"),
            false,
            true,
        );
        if let Some(data) = self.string(o.get("data"), &format!("{at}.data"), false)
            && !base64_ok(&data)
        {
            self.err(&format!("{at}.data"), "is not base64");
        }
        self.media_type(o.get("artifactType"), &format!("{at}.artifactType"), false);
        if let Some(p) = o.get("platform") {
            let pat = format!("{at}.platform");
            if let Some(p) = self.object(p, &pat) {
                self.string(p.get("architecture"), &format!("{pat}.architecture"), true);
                self.string(p.get("os"), &format!("{pat}.os"), true);
                self.string(p.get("os.version"), &format!("{pat}.os.version"), false);
                self.string(p.get("variant"), &format!("{pat}.variant"), false);
                self.string_array(p.get("os.features"), &format!("{pat}.os.features"), false);
            }
        }
    }

    fn manifest(&mut self, v: &Value) {
        let Some(o) = self.object(v, "$") else { return };
        self.schema_version(o.get("schemaVersion"));
        if let Some(mt) = self.media_type(o.get("mediaType"), "mediaType", false)
            && mt != MEDIA_OCI_MANIFEST
            && mt != MEDIA_DOCKER_MANIFEST
        {
            self.err("mediaType", format!("`{mt}` is not a manifest media type"));
        }
        self.media_type(o.get("artifactType"), "artifactType", false);
        match o.get("config") {
            Some(c) => self.descriptor(c, "config"),
            None => self.err("config", "is required"),
        }
        match o.get("layers") {
            Some(Value::Array(a)) if a.is_empty() => {
                self.err("layers", "must have at least one entry")
            }
            Some(Value::Array(a)) => {
                for (i, l) in a.iter().enumerate() {
                    self.descriptor(l, &format!("layers[{i}]"));
                }
            }
            Some(_) => self.err("layers", "must be an array"),
            None => self.err("layers", "is required"),
        }
        if let Some(s) = o.get("subject") {
            self.descriptor(s, "subject");
        }
        self.map_of(o.get("annotations"), "annotations", false, true);
    }

    fn index(&mut self, v: &Value) {
        let Some(o) = self.object(v, "$") else { return };
        self.schema_version(o.get("schemaVersion"));
        if let Some(mt) = self.media_type(o.get("mediaType"), "mediaType", false)
            && mt != MEDIA_OCI_INDEX
            && mt != MEDIA_DOCKER_LIST
        {
            self.err("mediaType", format!("`{mt}` is not an index media type"));
        }
        self.media_type(o.get("artifactType"), "artifactType", false);
        match o.get("manifests") {
            Some(Value::Array(a)) => {
                for (i, m) in a.iter().enumerate() {
                    self.descriptor(m, &format!("manifests[{i}]"));
                }
            }
            Some(_) => self.err("manifests", "must be an array"),
            None => self.err("manifests", "is required"),
        }
        if let Some(s) = o.get("subject") {
            self.descriptor(s, "subject");
        }
        self.map_of(o.get("annotations"), "annotations", false, true);
    }

    fn config(&mut self, v: &Value) {
        let Some(o) = self.object(v, "$") else { return };
        if let Some(c) = self.string(o.get("created"), "created", false)
            && crate::image::parse_rfc3339(&c).is_none()
        {
            self.err("created", format!("`{c}` is not an RFC 3339 date-time"));
        }
        self.string(o.get("author"), "author", false);
        self.string(o.get("architecture"), "architecture", true);
        self.string(o.get("os"), "os", true);
        self.string(o.get("variant"), "variant", false);
        self.string(o.get("os.version"), "os.version", false);
        self.string_array(o.get("os.features"), "os.features", false);
        if let Some(c) = o.get("config")
            && let Some(c) = self.object(c, "config")
        {
            self.string(c.get("User"), "config.User", false);
            self.map_of(c.get("ExposedPorts"), "config.ExposedPorts", false, false);
            if let Some(env) = self.string_array(c.get("Env"), "config.Env", false) {
                for e in env {
                    if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                        self.err("config.Env", format!("`{e}` is not `KEY=value`"));
                    }
                }
            }
            self.string_array(c.get("Entrypoint"), "config.Entrypoint", true);
            self.string_array(c.get("Cmd"), "config.Cmd", true);
            self.map_of(c.get("Volumes"), "config.Volumes", true, false);
            self.string(c.get("WorkingDir"), "config.WorkingDir", false);
            self.map_of(c.get("Labels"), "config.Labels", true, true);
            self.string(c.get("StopSignal"), "config.StopSignal", false);
            if c.get("ArgsEscaped").is_some_and(|a| !a.is_boolean()) {
                self.err("config.ArgsEscaped", "must be a boolean");
            }
        }
        match o.get("rootfs") {
            Some(r) => {
                if let Some(r) = self.object(r, "rootfs") {
                    if let Some(t) = self.string(r.get("type"), "rootfs.type", true)
                        && t != "layers"
                    {
                        self.err("rootfs.type", format!("`{t}` must be `layers`"));
                    }
                    match self.string_array(r.get("diff_ids"), "rootfs.diff_ids", false) {
                        Some(ids) => {
                            for d in ids {
                                if let Err(reason) = digest_ok(&d) {
                                    self.err("rootfs.diff_ids", format!("`{d}` {reason}"));
                                }
                            }
                        }
                        None if r.get("diff_ids").is_none() => {
                            self.err("rootfs.diff_ids", "is required")
                        }
                        None => {}
                    }
                }
            }
            None => self.err("rootfs", "is required"),
        }
        match o.get("history") {
            None => {}
            Some(Value::Array(h)) => {
                for (i, e) in h.iter().enumerate() {
                    let at = format!("history[{i}]");
                    let Some(e) = self.object(e, &at) else {
                        continue;
                    };
                    for f in ["created", "author", "created_by", "comment"] {
                        self.string(e.get(f), &format!("{at}.{f}"), false);
                    }
                    if e.get("empty_layer").is_some_and(|b| !b.is_boolean()) {
                        self.err(&format!("{at}.empty_layer"), "must be a boolean");
                    }
                }
            }
            Some(_) => self.err("history", "must be an array"),
        }
    }

    fn layout(&mut self, v: &Value) {
        let Some(o) = self.object(v, "$") else { return };
        if let Some(version) = self.string(o.get("imageLayoutVersion"), "imageLayoutVersion", true)
            && version != "1.0.0"
        {
            self.err("imageLayoutVersion", format!("`{version}` is not `1.0.0`"));
        }
    }
}

/// `type/subtype` per the image-spec's media type pattern.
pub fn media_type_ok(s: &str) -> bool {
    fn part(p: &str) -> bool {
        let b = p.as_bytes();
        !b.is_empty()
            && b.len() <= 127
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&c))
    }
    s.split_once('/').is_some_and(|(t, st)| part(t) && part(st))
}

/// The go-digest rules: `algorithm:encoded` with the grammar of the
/// image-spec; registered algorithms need exactly their hex length.
pub fn digest_ok(s: &str) -> Result<(), &'static str> {
    let Some((alg, enc)) = s.split_once(':') else {
        return Err("is not `algorithm:encoded`");
    };
    let comp = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let mut rest = alg;
    loop {
        match rest.find(['+', '.', '_', '-']) {
            Some(i) => {
                if !comp(&rest[..i]) {
                    return Err("has an invalid algorithm");
                }
                rest = &rest[i + 1..];
            }
            None => {
                if !comp(rest) {
                    return Err("has an invalid algorithm");
                }
                break;
            }
        }
    }
    if enc.is_empty()
        || !enc
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
    {
        return Err("has an invalid encoded part");
    }
    let hexlen = match alg {
        "sha256" => Some(64),
        "sha384" => Some(96),
        "sha512" => Some(128),
        _ => None,
    };
    if let Some(n) = hexlen
        && (enc.len() != n || !enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err("must have the algorithm's length of lowercase hex");
    }
    Ok(())
}

fn uri_ok(s: &str) -> bool {
    // RFC 3986: scheme ":" hier-part; no spaces or controls.
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let sb = scheme.as_bytes();
    !sb.is_empty()
        && sb[0].is_ascii_alphabetic()
        && sb
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
        && !rest.bytes().any(|c| c.is_ascii_control() || c == b' ')
}

fn base64_ok(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return false;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    pad <= 2
        && b[..b.len() - pad]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_grammar() {
        assert!(
            digest_ok("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .is_ok()
        );
        assert!(
            digest_ok("sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855")
                .is_err()
        );
        assert!(
            digest_ok("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8").is_ok()
        );
        assert!(digest_ok("sha256+foo+-b:abc").is_err());
        assert!(digest_ok("sha256:").is_err());
        assert!(digest_ok(":abc").is_err());
    }

    #[test]
    fn media_types() {
        assert!(media_type_ok("application/vnd.oci.image.manifest.v1+json"));
        assert!(!media_type_ok("invalid"));
        assert!(!media_type_ok("application/"));
        assert!(!media_type_ok(".foo/bar"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for kind in [DocumentKind::Descriptor, DocumentKind::Manifest, DocumentKind::Index, DocumentKind::Config, DocumentKind::Layout] {
                let _ = validate_document(kind, &bytes, "fuzz");
            }
        }

        #[test]
        fn digest_rules_never_panic(s in "\\PC{0,100}") {
            let _ = digest_ok(&s);
            let _ = media_type_ok(&s);
            let _ = s.parse::<crate::Digest>();
        }
    }
}
