//! `--chown=user[:group]` and WORKDIR's owner, resolved as BuildKit's file
//! backend does (`readUser`): a number is an id (a lone uid also gives the
//! gid: `--chown=10` is 10:10); a user name takes uid and primary gid from
//! the destination root's `/etc/passwd`; a group name its gid from
//! `/etc/group`. Both files are read through [`resolve`], so a symlinked
//! `/etc/passwd` can't point out of the root.

use std::path::Path;

use super::FileOpError;
use super::root::{is_absent, resolve};

/// A resolved owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Owner {
    pub uid: u32,
    pub gid: u32,
}

const MAX_ID: u64 = i32::MAX as u64;

/// Resolve `spec` (`user`, `user:group`, ids or names) in `root`.
pub(super) fn resolve_owner(root: &Path, spec: &str) -> Result<Owner, FileOpError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let mut owner = Owner { uid: 0, gid: 0 };
    if let Some(id) = numeric(user, "uid")? {
        owner = Owner { uid: id, gid: id };
    } else if !user.is_empty() {
        let passwd = read_in_root(root, "/etc/passwd")?;
        let entry = passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 4 && f[0] == user).then(|| (f[2].parse::<u32>(), f[3].parse::<u32>()))
            })
            .find_map(|(u, g)| Some((u.ok()?, g.ok()?)));
        match entry {
            Some((uid, gid)) => owner = Owner { uid, gid },
            None => {
                return Err(FileOpError::UnknownId {
                    what: "user",
                    name: user.to_owned(),
                    file: "passwd",
                });
            }
        }
    }
    if let Some(group) = group.filter(|g| !g.is_empty()) {
        if let Some(id) = numeric(group, "gid")? {
            owner.gid = id;
        } else {
            let groups = read_in_root(root, "/etc/group")?;
            let gid = groups
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == group).then(|| f[2].parse::<u32>().ok())
                })
                .flatten()
                .next();
            owner.gid = gid.ok_or_else(|| FileOpError::UnknownId {
                what: "group",
                name: group.to_owned(),
                file: "group",
            })?;
        }
    }
    Ok(owner)
}

/// `Some(id)` for a decimal number in range, `None` for a name.
fn numeric(text: &str, what: &'static str) -> Result<Option<u32>, FileOpError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    text.parse::<u64>()
        .ok()
        .filter(|v| *v <= MAX_ID)
        .and_then(|v| u32::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| FileOpError::BadId {
            what,
            value: text.to_owned(),
        })
}

/// The text of a file inside the root; empty when it does not exist.
fn read_in_root(root: &Path, path: &str) -> Result<String, FileOpError> {
    let p = resolve(root, path, true)?;
    match fs_err::read(&p.host) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if is_absent(&e) => Ok(String::new()),
        Err(e) => Err(e.into()),
    }
}
