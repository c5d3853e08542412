//! A network namespace made ahead of the container, so that `eth0` is ready before
//! the container's first instruction runs.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::NetworkError;

/// A process (`unshare --net cat`) that holds a fresh network namespace.
///
/// `kiln run --network NAME` makes one, [`attach`](super::attach)es its
/// [`pid`](Self::pid), starts the sandbox with `Network::Netns(holder.path())`,
/// and drops the holder once the sandbox has joined the namespace (after
/// `Running::wait_ready`): the namespace, and the attachment, then live as long as
/// the container's processes do.
#[derive(Debug)]
pub struct NetnsHolder {
    child: Child,
}

impl NetnsHolder {
    /// Starts the holder and waits until it is in its own network namespace.
    pub fn spawn() -> Result<NetnsHolder, NetworkError> {
        let command = "unshare --net -- cat".to_owned();
        let child = Command::new("unshare")
            .args(["--net", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| NetworkError::Spawn {
                command: command.clone(),
                source,
            })?;
        let mut holder = NetnsHolder { child };
        let own = fs_err::metadata("/proc/self/ns/net")?.ino();
        let path = holder.path();
        // unshare(2) then exec in place: a few milliseconds at most.
        for _ in 0..5000 {
            if fs_err::metadata(&path).is_ok_and(|m| m.ino() != own) {
                return Ok(holder);
            }
            if let Ok(Some(status)) = holder.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = holder.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                return Err(NetworkError::Command {
                    command,
                    status: status.to_string(),
                    stderr: stderr.trim().to_owned(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Err(NetworkError::Command {
            command,
            status: "still running".to_owned(),
            stderr: "no new network namespace after 1 s".to_owned(),
        })
    }

    /// The holder's pid (pass it to [`attach`](super::attach)).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `/proc/PID/ns/net`: the namespace for the sandbox to join.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        // Closing stdin ends `cat`; the kill covers a holder that is stuck.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
