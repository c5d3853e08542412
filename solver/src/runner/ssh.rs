//! `RUN --mount=type=ssh`: an SSH agent forwarded into a RUN, as BuildKit
//! forwards the one `--ssh` names.
//!
//! BuildKit does not show the client's agent socket to the RUN: it serves a
//! socket of its own, owned by the mount's `uid`/`gid` (default 0:0) with
//! its `mode` (default 0600), and relays each connection to the agent.
//! This does the same: a listening socket in the step's scratch directory
//! (bind-mounted at the mount's target), and a thread that relays each
//! connection to the agent's socket, until the RUN is over.

use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// A socket that relays to an agent; stops relaying new connections when
/// dropped (those open end when either side closes).
#[derive(Debug)]
pub(crate) struct AgentRelay {
    path: PathBuf,
    listener: UnixListener,
    accepting: Option<JoinHandle<()>>,
}

impl AgentRelay {
    /// Listens at `path` (which must not exist), owned by `uid`:`gid` with
    /// `mode`, relaying to the agent at `agent`.
    pub(crate) fn start(
        path: &Path,
        agent: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> io::Result<AgentRelay> {
        let listener = bind_short(path)?;
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))?;
        let accept_on = listener.try_clone()?;
        let agent = agent.to_owned();
        let accepting = std::thread::Builder::new()
            .name("ssh-relay".to_owned())
            .spawn(move || {
                // Ends when the listener is shut down (see `Drop`).
                for client in accept_on.incoming() {
                    let Ok(client) = client else { break };
                    // An agent that is gone closes the client's connection.
                    if let Ok(upstream) = connect_short(&agent) {
                        relay(client, upstream);
                    }
                }
            })?;
        Ok(AgentRelay {
            path: path.to_owned(),
            listener,
            accepting: Some(accepting),
        })
    }

    /// The listening socket.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A name for the socket at `path` that fits a socket address (108
/// bytes): the path itself, or, when it is longer, the name in its
/// directory opened, through `/proc/self/fd/<fd>/` (the directory stays
/// open as long as the name is used). A store at a long path can still
/// forward an agent.
fn short_name(path: &Path) -> io::Result<(PathBuf, Option<fs_err::File>)> {
    const MAX: usize = 100;
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if path.as_os_str().len() >= MAX => {
            let dir = fs_err::File::open(dir)?;
            let short = Path::new("/proc/self/fd")
                .join(dir.file().as_raw_fd().to_string())
                .join(name);
            Ok((short, Some(dir)))
        }
        _ => Ok((path.to_owned(), None)),
    }
}

fn bind_short(path: &Path) -> io::Result<UnixListener> {
    let (name, _dir) = short_name(path)?;
    UnixListener::bind(name)
}

fn connect_short(path: &Path) -> io::Result<UnixStream> {
    let (name, _dir) = short_name(path)?;
    UnixStream::connect(name)
}

/// Copies each way on a thread of its own; each side's end of input shuts
/// the other's output, so both threads end once both sides are done.
fn relay(client: UnixStream, upstream: UnixStream) {
    let pairs = [
        (client.try_clone(), upstream.try_clone()),
        (upstream.try_clone(), client.try_clone()),
    ];
    for (from, to) in pairs {
        let (Ok(mut from), Ok(mut to)) = (from, to) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("ssh-relay-io".to_owned())
            .spawn(move || {
                let _ = io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        if spawned.is_err() {
            return;
        }
    }
}

impl Drop for AgentRelay {
    fn drop(&mut self) {
        // `shutdown` on a listening socket wakes the blocked `accept` with
        // an error (Linux): the accept thread ends.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
        let _ = fs_err::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::MetadataExt as _;

    /// Bytes go both ways through the relay, the socket has the asked
    /// owner and mode, and dropping the relay stops it and removes it.
    /// (In a directory whose path is too long for a socket address.)
    #[test]
    fn relays_both_ways_with_the_owner_and_mode_asked() {
        let top = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = top
            .path()
            .join("a-directory-name-that-makes-the-path-long".repeat(3));
        fs_err::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(dir.join("relay.sock").as_os_str().len() > 108);
        let dir = tempfile::tempdir_in(&dir).unwrap_or_else(|e| panic!("{e}"));
        let agent_path = dir.path().join("agent.sock");
        let agent = bind_short(&agent_path).unwrap_or_else(|e| panic!("{e}"));
        // The agent answers each request with it reversed, then closes.
        let agent_thread = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut c, _) = agent.accept().unwrap_or_else(|e| panic!("{e}"));
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).unwrap_or_else(|e| panic!("{e}"));
                buf.reverse();
                c.write_all(&buf).unwrap_or_else(|e| panic!("{e}"));
            }
        });
        let path = dir.path().join("relay.sock");
        // (Any owner as root; one's own otherwise.)
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (1234, 5678)
        } else {
            (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
        };
        let relay = AgentRelay::start(&path, &agent_path, uid, gid, 0o660)
            .unwrap_or_else(|e| panic!("{e}"));
        let meta = fs_err::symlink_metadata(relay.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (uid, gid, 0o660)
        );
        for _ in 0..2 {
            let mut c = connect_short(&path).unwrap_or_else(|e| panic!("{e}"));
            c.write_all(b"ping").unwrap_or_else(|e| panic!("{e}"));
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(answer, b"gnip");
        }
        agent_thread.join().unwrap_or_else(|_| panic!("agent"));
        drop(relay);
        assert!(!path.exists(), "the relay's socket stays");
        assert!(connect_short(&path).is_err());
    }
}
