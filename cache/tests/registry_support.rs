//! A real registry for tests: Debian's `docker-registry` (distribution
//! 2.8) on 127.0.0.1 with a free port and a temp storage dir, optionally
//! with htpasswd auth; killed on drop.
#![allow(dead_code, clippy::print_stderr, reason = "shared test support")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

#[derive(Debug)]
pub struct Registry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub ip: String,
}

/// Whether the registry tests can run; with CI=true a missing tool fails.
pub fn available() -> bool {
    let ok = Path::new(REGISTRY_BIN).exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{REGISTRY_BIN} is missing (apt package docker-registry; see .ci/setup)"
        );
        eprintln!("skipping: {REGISTRY_BIN} is not installed");
    }
    ok
}

/// A non-loopback IPv4 address of this machine, if it has one.
pub fn outside_ip() -> Option<String> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(str::to_owned)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Registry {
    /// Starts a registry on 127.0.0.1; with `auth`, users `(name,
    /// password)` in htpasswd.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        Registry::start_on("127.0.0.1", auth, false)
    }

    /// Starts a registry on `ip`, with a certificate for it signed by a
    /// test CA ([`Registry::cert`]) when `tls`.
    pub fn start_on(ip: &str, auth: Option<(&str, &str)>, tls: bool) -> Registry {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let mut config = format!(
                "version: 0.1\nlog: {{ level: error }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\n  delete: {{ enabled: true }}\nhttp:\n  addr: {ip}:{port}\n",
                dir.path().join("data").display()
            );
            if tls {
                let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
                let d = dir.path();
                fs_err::write(
                    d.join("leaf.ext"),
                    format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
                )
                .expect("write ext");
                let openssl = |args: &[&str]| {
                    let out = Command::new("openssl")
                        .args(args)
                        .current_dir(d)
                        .output()
                        .expect("openssl runs");
                    assert!(
                        out.status.success(),
                        "openssl {args:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                };
                // A CA, and a server certificate for `ip` signed by it.
                openssl(&[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=kiln-test-ca",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                ]);
                openssl(&[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=kiln-test",
                    "-keyout",
                    "key.pem",
                    "-out",
                    "leaf.csr",
                ]);
                openssl(&[
                    "x509",
                    "-req",
                    "-in",
                    "leaf.csr",
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    "leaf.ext",
                    "-out",
                    "cert.pem",
                ]);
                config.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                ));
            }
            if let Some((user, password)) = auth {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd runs (apt package apache2-utils)");
                assert!(out.status.success(), "htpasswd failed");
                let path = dir.path().join("htpasswd");
                fs_err::write(&path, &out.stdout).expect("write htpasswd");
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    path.display()
                ));
            }
            let config_path = dir.path().join("config.yml");
            fs_err::write(&config_path, config).expect("write config");
            let log = fs_err::File::create(dir.path().join("log")).expect("log");
            let child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.file().try_clone().expect("dup"))
                .stderr(log.into_file())
                .spawn()
                .expect("start docker-registry");
            let mut reg = Registry {
                child,
                port,
                dir,
                ip: ip.to_owned(),
            };
            if reg.wait_ready() {
                return reg;
            }
            drop(reg);
        }
        panic!("docker-registry did not come up");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect((self.ip.as_str(), self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `<ip>:<port>`.
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The CA that signed a TLS registry's certificate.
    pub fn cert(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
