//! The host side: links through `ip` (iproute2), firewall rules through `iptables`,
//! and a few sysctls. Plain commands keep this short and easy to reproduce by hand.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::NetworkError;

/// One iptables rule: `iptables -t TABLE -A CHAIN ARGS...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rule {
    pub(crate) table: String,
    pub(crate) chain: String,
    /// Insert at the top of the chain instead of appending.
    #[serde(default)]
    pub(crate) first: bool,
    pub(crate) args: Vec<String>,
}

impl Rule {
    pub(crate) fn new(table: &str, chain: &str, first: bool, args: &[&str], tag: &str) -> Rule {
        let mut args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["-m", "comment", "--comment", tag].map(str::to_owned));
        Rule {
            table: table.to_owned(),
            chain: chain.to_owned(),
            first,
            args,
        }
    }

    fn command(&self, op: &str) -> Vec<String> {
        let mut v = vec![
            "-w".to_owned(),
            "-t".to_owned(),
            self.table.clone(),
            op.to_owned(),
            self.chain.clone(),
        ];
        v.extend(self.args.iter().cloned());
        v
    }
}

/// Finds a system tool in `PATH` or the usual sbin directories (root's `PATH` may
/// lack them under `sudo`/`env -i`).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a command, feeding it `stdin`; an exit status other than 0 is an error
/// that quotes the command and its stderr.
fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<(), NetworkError> {
    let mut cmd = Command::new(tool(program));
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let shown = || {
        let mut s = format!("{program} {}", args.join(" "));
        if let Some(input) = stdin {
            s.push_str(" <<< ");
            s.push_str(&input.trim_end().replace('\n', "; "));
        }
        s
    };
    let mut child = cmd.spawn().map_err(|source| NetworkError::Spawn {
        command: shown(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that fails early may close its stdin: its status says why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetworkError::Spawn {
            command: shown(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            command: shown(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip -batch -` with one command per line, stopping at the first failure.
pub(crate) fn ip_batch(lines: &[String]) -> Result<(), NetworkError> {
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    run("ip", &["-batch".to_owned(), "-".to_owned()], Some(&input))
}

/// Runs `ip -batch -` inside the network namespace of `pid`.
pub(crate) fn ip_batch_in(pid: u32, lines: &[String]) -> Result<(), NetworkError> {
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let ip = tool("ip").display().to_string();
    run(
        "nsenter",
        &[
            format!("--net=/proc/{pid}/ns/net"),
            "--".to_owned(),
            ip,
            "-batch".to_owned(),
            "-".to_owned(),
        ],
        Some(&input),
    )
}

/// Whether a link of that name exists in the host's network namespace.
pub(crate) fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Deletes a link if it exists.
pub(crate) fn delete_link(name: &str) -> Result<(), NetworkError> {
    if !link_exists(name) {
        return Ok(());
    }
    match run("ip", &["link".into(), "del".into(), name.into()], None) {
        // It may have gone meanwhile (a veth dies with its peer's namespace).
        Err(_) if !link_exists(name) => Ok(()),
        other => other,
    }
}

/// The rules as `iptables-restore` input, one `*table ... COMMIT` block per table.
fn restore_input(rules: &[Rule], op: impl Fn(&Rule) -> &'static str) -> String {
    let mut out = String::new();
    let mut tables: Vec<&str> = rules.iter().map(|r| r.table.as_str()).collect();
    tables.dedup();
    tables.sort_unstable();
    tables.dedup();
    for table in tables {
        out.push_str(&format!("*{table}\n"));
        for r in rules.iter().filter(|r| r.table == table) {
            out.push_str(&format!("{} {}", op(r), r.chain));
            for a in &r.args {
                // Arguments never hold quotes (names and ids are checked); the
                // comment holds spaces.
                if a.contains(char::is_whitespace) {
                    out.push_str(&format!(" \"{a}\""));
                } else {
                    out.push(' ');
                    out.push_str(a);
                }
            }
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn restore(input: &str) -> Result<(), NetworkError> {
    run(
        "iptables-restore",
        &["-w".to_owned(), "--noflush".to_owned()],
        Some(input),
    )
}

/// Adds fresh rules in one atomic `iptables-restore` (no check for duplicates: the
/// caller knows they are not there).
pub(crate) fn add_fresh_rules(rules: &[Rule]) -> Result<(), NetworkError> {
    if rules.is_empty() {
        return Ok(());
    }
    restore(&restore_input(rules, |r| if r.first { "-I" } else { "-A" }))
}

/// Deletes the rules, in one `iptables-restore` when they are all there, else one by
/// one (idempotent).
pub(crate) fn delete_rules(rules: &[Rule]) -> Result<(), NetworkError> {
    if rules.is_empty() || restore(&restore_input(rules, |_| "-D")).is_ok() {
        return Ok(());
    }
    rules.iter().try_for_each(delete_rule)
}

/// Adds the rule unless it is there already.
pub(crate) fn add_rule(rule: &Rule) -> Result<(), NetworkError> {
    if run("iptables", &rule.command("-C"), None).is_ok() {
        return Ok(());
    }
    let op = if rule.first { "-I" } else { "-A" };
    run("iptables", &rule.command(op), None)
}

/// Deletes the rule if it is there.
pub(crate) fn delete_rule(rule: &Rule) -> Result<(), NetworkError> {
    while run("iptables", &rule.command("-C"), None).is_ok() {
        run("iptables", &rule.command("-D"), None)?;
    }
    Ok(())
}

/// Writes a sysctl under `/proc/sys` (`net/ipv4/ip_forward`, ...).
pub(crate) fn sysctl(key: &str, value: &str) -> Result<(), NetworkError> {
    let path = Path::new("/proc/sys").join(key);
    if fs_err::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs_err::write(&path, value).map_err(NetworkError::Io)
}

/// The inode of the network namespace of `pid`, or `None` when it is gone.
pub(crate) fn netns_inode(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs_err::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Whether the network namespace recorded as (`pid`, `inode`) still has a process in
/// it: `pid` itself (the usual case), or else any process (the pid given at attach
/// time may have been a short-lived holder whose namespace the container joined).
pub(crate) fn netns_alive(pid: u32, inode: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    if netns_inode(pid) == Some(inode) {
        return true;
    }
    let Ok(entries) = fs_err::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && fs_err::metadata(e.path().join("ns/net")).is_ok_and(|m| m.ino() == inode)
    })
}
