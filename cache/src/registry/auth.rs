//! Credentials: docker's `config.json` (`auths`), and the
//! `WWW-Authenticate` challenges registries answer with.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

use super::RegistryError;
use super::reference::{DOCKER_HUB, DOCKER_HUB_API};

/// The key docker uses for Docker Hub in `auths`.
pub const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `Authorization: Basic ...` value.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            BASE64.encode(format!("{}:{}", self.username, self.password))
        )
    }
}

/// docker's client config file, read and written keeping every field
/// kiln does not know.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
    doc: Map<String, Value>,
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The registry host an `auths` key names: `https://index.docker.io/v1/`
/// → `docker.io`, `http://host:5000/v2/` → `host:5000`.
pub fn normalize_registry(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | DOCKER_HUB_API | "registry.hub.docker.com" => DOCKER_HUB.to_owned(),
        _ => host,
    }
}

/// The `auths` key docker writes for a registry.
pub fn config_key(registry: &str) -> String {
    if normalize_registry(registry) == DOCKER_HUB {
        DOCKER_HUB_CONFIG_KEY.to_owned()
    } else {
        registry.to_owned()
    }
}

impl DockerConfig {
    /// Reads the config at the default path (an empty one if there is
    /// none).
    pub fn load_default() -> Result<DockerConfig, RegistryError> {
        let path = default_config_path().ok_or_else(|| RegistryError::Config {
            path: PathBuf::from("~/.docker/config.json"),
            reason: "neither DOCKER_CONFIG nor HOME is set".to_owned(),
        })?;
        DockerConfig::load(&path)
    }

    /// Reads `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<DockerConfig, RegistryError> {
        let doc = match fs_err::read(path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Map::new(),
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => m,
                Ok(_) => {
                    return Err(RegistryError::Config {
                        path: path.to_owned(),
                        reason: "it is not a JSON object".to_owned(),
                    });
                }
                Err(e) => {
                    return Err(RegistryError::Config {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    });
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
            Err(e) => {
                return Err(RegistryError::Config {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        Ok(DockerConfig {
            path: path.to_owned(),
            doc,
        })
    }

    /// Where the config lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved credentials for `registry` (`docker.io`, `host:port`):
    /// from its credential helper (`credHelpers`, else `credsStore`, as
    /// docker asks `docker-credential-<name> get`), else from `auths`.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        if let Some(helper) = self.helper_for(registry)
            && let Some(c) = self.ask_helper(&helper, registry)?
        {
            return Ok(Some(c));
        }
        self.lookup_auths(registry)
    }

    fn helper_for(&self, registry: &str) -> Option<String> {
        let want = normalize_registry(registry);
        if let Some(Value::Object(helpers)) = self.doc.get("credHelpers") {
            for (k, v) in helpers {
                if normalize_registry(k) == want
                    && let Some(h) = v.as_str().filter(|h| !h.is_empty())
                {
                    return Some(h.to_owned());
                }
            }
        }
        self.doc
            .get("credsStore")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
    }

    /// Runs `docker-credential-<helper> get` with the server on stdin.
    fn ask_helper(
        &self,
        helper: &str,
        registry: &str,
    ) -> Result<Option<Credentials>, RegistryError> {
        use std::process::{Command, Stdio};
        let bad = |reason: String| RegistryError::Config {
            path: self.path.clone(),
            reason: format!("credential helper `docker-credential-{helper}`: {reason}"),
        };
        if !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(bad("the helper name is malformed".to_owned()));
        }
        let mut child = match Command::new(format!("docker-credential-{helper}"))
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            // Not installed: docker fails here; falling back to `auths`
            // keeps a config copied from another machine usable.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(e.to_string())),
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(config_key(registry).as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| bad(e.to_string()))?;
        if !out.status.success() {
            // "credentials not found in native keychain"
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| bad(format!("its answer is not JSON: {e}")))?;
        let user = v.get("Username").and_then(Value::as_str).unwrap_or("");
        let secret = v.get("Secret").and_then(Value::as_str).unwrap_or("");
        if user.is_empty() || secret.is_empty() || user == "<token>" {
            return Ok(None);
        }
        Ok(Some(Credentials {
            username: user.to_owned(),
            password: secret.to_owned(),
        }))
    }

    fn lookup_auths(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        let want = normalize_registry(registry);
        let Some(Value::Object(auths)) = self.doc.get("auths") else {
            return Ok(None);
        };
        for (key, entry) in auths {
            if normalize_registry(key) != want {
                continue;
            }
            let bad = |reason: &str| RegistryError::Config {
                path: self.path.clone(),
                reason: format!("auths.\"{key}\": {reason}"),
            };
            if let Some(auth) = entry.get("auth").and_then(Value::as_str)
                && !auth.is_empty()
            {
                let decoded = BASE64
                    .decode(auth.trim())
                    .map_err(|_| bad("`auth` is not base64"))?;
                let text =
                    String::from_utf8(decoded).map_err(|_| bad("`auth` is not UTF-8 text"))?;
                let (u, p) = text
                    .split_once(':')
                    .ok_or_else(|| bad("`auth` is not `user:password`"))?;
                return Ok(Some(Credentials {
                    username: u.to_owned(),
                    password: p.to_owned(),
                }));
            }
            if let (Some(u), Some(p)) = (
                entry.get("username").and_then(Value::as_str),
                entry.get("password").and_then(Value::as_str),
            ) {
                return Ok(Some(Credentials {
                    username: u.to_owned(),
                    password: p.to_owned(),
                }));
            }
        }
        Ok(None)
    }

    /// Records credentials for `registry` (call [`DockerConfig::save`]).
    pub fn set_credentials(&mut self, registry: &str, creds: &Credentials) {
        self.remove_credentials(registry);
        let auths = self
            .doc
            .entry("auths")
            .or_insert_with(|| Value::Object(Map::new()));
        if !auths.is_object() {
            *auths = Value::Object(Map::new());
        }
        if let Value::Object(auths) = auths {
            let auth = BASE64.encode(format!("{}:{}", creds.username, creds.password));
            auths.insert(config_key(registry), serde_json::json!({ "auth": auth }));
        }
    }

    /// Forgets the credentials for `registry`; whether there were any.
    pub fn remove_credentials(&mut self, registry: &str) -> bool {
        let want = normalize_registry(registry);
        let Some(Value::Object(auths)) = self.doc.get_mut("auths") else {
            return false;
        };
        let before = auths.len();
        auths.retain(|k, _| normalize_registry(k) != want);
        auths.len() != before
    }

    /// Writes the config back (temp file, mode 0600, rename).
    pub fn save(&self) -> Result<(), RegistryError> {
        let fail = |e: std::io::Error| RegistryError::Config {
            path: self.path.clone(),
            reason: format!("writing it: {e}"),
        };
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs_err::create_dir_all(dir).map_err(fail)?;
        let mut bytes =
            serde_json::to_vec_pretty(&self.doc).map_err(|e| RegistryError::Config {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        bytes.push(b'\n');
        let temp = dir.join(format!(".config.json.{}.tmp", std::process::id()));
        let result = (|| {
            use fs_err::os::unix::fs::OpenOptionsExt as _;
            let mut f = fs_err::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs_err::rename(&temp, &self.path)
        })();
        if result.is_err() {
            let _ = fs_err::remove_file(&temp);
        }
        result.map_err(fail)
    }
}

/// What a registry asks for in `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP basic auth.
    Basic,
    /// A bearer token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic ...`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `k=v, k="v, with comma"` → pairs.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".to_owned(),
                service: Some("registry.docker.io".to_owned()),
                scope: Some("repository:library/busybox:pull,push".to_owned()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=http://x/t"),
            Some(Challenge::Bearer {
                realm: "http://x/t".to_owned(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn config_round_trip_keeps_other_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d/config.json");
        let mut c = DockerConfig::load(&path).expect("missing file is empty");
        assert_eq!(c.credentials("localhost:5000").expect("ok"), None);
        fs_err::create_dir_all(dir.path().join("d")).expect("mkdir");
        fs_err::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}},"credsStore":"x"}"#,
        )
        .expect("write");
        c = DockerConfig::load(&path).expect("loads");
        let hub = c.credentials("docker.io").expect("ok").expect("hub creds");
        assert_eq!((hub.username.as_str(), hub.password.as_str()), ("u", "p"));
        let creds = Credentials {
            username: "me".to_owned(),
            password: "se:cret".to_owned(),
        };
        c.set_credentials("localhost:5000", &creds);
        c.save().expect("saves");
        let again = DockerConfig::load(&path).expect("loads");
        assert_eq!(
            again.credentials("localhost:5000").expect("ok"),
            Some(creds)
        );
        assert_eq!(
            again
                .credentials("http://localhost:5000/v2/")
                .expect("ok")
                .map(|c| c.username),
            Some("me".to_owned())
        );
        let text = fs_err::read_to_string(&path).expect("read");
        assert!(text.contains("credsStore"), "{text}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs_err::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut again = again;
        assert!(again.remove_credentials("localhost:5000"));
        assert!(!again.remove_credentials("localhost:5000"));
        again.save().expect("saves");
        assert_eq!(
            DockerConfig::load(&path)
                .expect("loads")
                .credentials("localhost:5000")
                .expect("ok"),
            None
        );
    }

    #[test]
    fn credential_helpers_are_asked_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        // A helper that is not installed: `auths` answers.
        fs_err::write(
            &path,
            r#"{"credsStore":"kiln-test-absent","auths":{"h:1":{"auth":"dTpw"}}}"#,
        )
        .expect("write");
        let c = DockerConfig::load(&path).expect("loads");
        assert_eq!(c.helper_for("h:1").as_deref(), Some("kiln-test-absent"));
        let got = c.credentials("h:1").expect("ok").expect("from auths");
        assert_eq!(got.username, "u");
        fs_err::write(
            &path,
            r#"{"credsStore":"a","credHelpers":{"https://h:1":"b"}}"#,
        )
        .expect("write");
        let c = DockerConfig::load(&path).expect("loads");
        assert_eq!(c.helper_for("h:1").as_deref(), Some("b"));
        assert_eq!(c.helper_for("other").as_deref(), Some("a"));
        fs_err::write(&path, r#"{"credsStore":"../x"}"#).expect("write");
        let err = DockerConfig::load(&path)
            .expect("loads")
            .credentials("h")
            .expect_err("bad helper name");
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    #[test]
    fn bad_config_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        fs_err::write(&path, "{not json").expect("write");
        let err = DockerConfig::load(&path).expect_err("bad json");
        assert!(err.to_string().contains("config.json"), "{err}");
        fs_err::write(&path, r#"{"auths":{"h":{"auth":"!!"}}}"#).expect("write");
        let err = DockerConfig::load(&path)
            .expect("parses")
            .credentials("h")
            .expect_err("bad base64");
        assert!(err.to_string().contains("base64"), "{err}");
    }
}
