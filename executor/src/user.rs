//! `USER` resolution with Docker's semantics (moby/sys/user `GetExecUser`).
//!
//! Pure functions over the text of `/etc/passwd` and `/etc/group`; the sandbox
//! calls them after `pivot_root`, so the files read are the rootfs's own.
//!
//! - `""` is root (uid 0, gid 0, home of uid 0's entry or `/`).
//! - A numeric user is always a uid, with or without a passwd entry.
//! - A name must have a passwd entry.
//! - With an explicit group (`user:group`), the gid is that group's (a numeric group
//!   is always a gid) and there are no supplementary groups; without one, the gid is
//!   the passwd entry's and the supplementary groups are every group listing the user
//!   by name.

use crate::spec::ResolvedUser;

/// Why a `USER` value could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// A user name with no `/etc/passwd` entry.
    #[error(
        "unable to find user `{name}`: no matching entries in passwd file\n\nhint: use a numeric uid, or create the user in the image first"
    )]
    UnknownUser {
        /// The name looked up.
        name: String,
    },
    /// A group name with no `/etc/group` entry.
    #[error("unable to find group `{name}`: no matching entries in group file")]
    UnknownGroup {
        /// The name looked up.
        name: String,
    },
    /// A numeric id out of the valid range.
    #[error("{what} `{value}` is out of range (0..=2147483647)")]
    OutOfRange {
        /// `uid` or `gid`.
        what: &'static str,
        /// The value as written.
        value: String,
    },
}

/// One parsed `/etc/passwd` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One parsed `/etc/group` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

const MAX_ID: u64 = i32::MAX as u64;

fn parse_id(text: &str) -> Option<u32> {
    let text = text.trim();
    text.parse::<u64>()
        .ok()
        .filter(|&v| v <= MAX_ID)
        .and_then(|v| u32::try_from(v).ok())
}

/// A numeric value: `Ok(Some(id))`, `Ok(None)` when not a number, `Err` when a
/// number out of range.
fn numeric(text: &str, what: &'static str) -> Result<Option<u32>, UserError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return parse_id(text)
            .map(Some)
            .ok_or_else(|| UserError::OutOfRange {
                what,
                value: text.to_owned(),
            });
    }
    Ok(None)
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next();
        let uid = parse_id(f.next()?)?;
        let gid = f.next().and_then(parse_id).unwrap_or(0);
        let _gecos = f.next();
        let home = f.next().unwrap_or("");
        Some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    group.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next();
        let gid = parse_id(f.next()?)?;
        let members = f
            .next()
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Some(GroupEntry { name, gid, members })
    })
}

/// Resolves a `USER` value against the text of `/etc/passwd` and `/etc/group`
/// (pass `""` for a missing file).
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, g),
        None => (spec, ""),
    };
    let uid_arg = numeric(user_arg, "uid")?;
    let gid_arg = numeric(group_arg, "gid")?;

    let mut resolved = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
        home: "/".to_owned(),
    };
    let matched = passwd_entries(passwd).find(|e| match (user_arg.is_empty(), uid_arg) {
        (true, _) => e.uid == 0,
        (false, Some(uid)) => e.uid == uid,
        (false, None) => e.name == user_arg,
    });
    let matched_name = match matched {
        Some(entry) => {
            resolved.uid = entry.uid;
            resolved.gid = entry.gid;
            if !entry.home.is_empty() {
                resolved.home = entry.home.to_owned();
            }
            Some(entry.name)
        }
        None => {
            if !user_arg.is_empty() {
                match uid_arg {
                    Some(uid) => resolved.uid = uid,
                    None => {
                        return Err(UserError::UnknownUser {
                            name: user_arg.to_owned(),
                        });
                    }
                }
            }
            None
        }
    };

    if !group_arg.is_empty() {
        let found = group_entries(group).find(|g| match gid_arg {
            Some(gid) => g.gid == gid,
            None => g.name == group_arg,
        });
        resolved.gid = match (found, gid_arg) {
            (Some(g), _) => g.gid,
            (None, Some(gid)) => gid,
            (None, None) => {
                return Err(UserError::UnknownGroup {
                    name: group_arg.to_owned(),
                });
            }
        };
    } else if let Some(name) = matched_name {
        resolved.additional_gids = group_entries(group)
            .filter(|g| g.members.contains(&name))
            .map(|g| g.gid)
            .collect();
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1001:App:/home/app:/bin/sh
broken:x:notanumber:1::/:/bin/sh
dup:x:1000:5::/dup:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:app,other
appgrp:x:1001:
audio:x:29: app
staff:x:50:other
";

    fn user(uid: u32, gid: u32, groups: &[u32], home: &str) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: groups.to_vec(),
            home: home.to_owned(),
        }
    }

    #[test]
    fn empty_is_root_with_roots_home() {
        assert_eq!(
            resolve_user("", PASSWD, GROUP),
            Ok(user(0, 0, &[], "/root"))
        );
        assert_eq!(resolve_user("", "", ""), Ok(user(0, 0, &[], "/")));
    }

    #[test]
    fn name_takes_passwd_gid_and_member_groups() {
        assert_eq!(
            resolve_user("app", PASSWD, GROUP),
            Ok(user(1000, 1001, &[10, 29], "/home/app"))
        );
    }

    #[test]
    fn numeric_uid_with_entry_is_that_entry_first_match_wins() {
        assert_eq!(
            resolve_user("1000", PASSWD, GROUP),
            Ok(user(1000, 1001, &[10, 29], "/home/app"))
        );
    }

    #[test]
    fn numeric_uid_without_files_works() {
        assert_eq!(resolve_user("4242", "", ""), Ok(user(4242, 0, &[], "/")));
        assert_eq!(
            resolve_user("4242:77", "", ""),
            Ok(user(4242, 77, &[], "/"))
        );
    }

    #[test]
    fn explicit_group_replaces_gid_and_drops_supplementary() {
        assert_eq!(
            resolve_user("app:wheel", PASSWD, GROUP),
            Ok(user(1000, 10, &[], "/home/app"))
        );
        assert_eq!(
            resolve_user("app:50", PASSWD, GROUP),
            Ok(user(1000, 50, &[], "/home/app"))
        );
        assert_eq!(
            resolve_user("app:999", PASSWD, GROUP),
            Ok(user(1000, 999, &[], "/home/app"))
        );
        assert_eq!(
            resolve_user("daemon:staff", PASSWD, GROUP),
            Ok(user(1, 50, &[], "/usr/sbin"))
        );
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let err = resolve_user("nobody-here", PASSWD, GROUP).unwrap_err();
        assert_eq!(
            err,
            UserError::UnknownUser {
                name: "nobody-here".into()
            }
        );
        assert!(
            err.to_string()
                .starts_with("unable to find user `nobody-here`"),
            "{err}"
        );
        assert_eq!(
            resolve_user("app:nogroup", PASSWD, GROUP),
            Err(UserError::UnknownGroup {
                name: "nogroup".into()
            })
        );
        // A numeric-looking name is a uid, never a name lookup.
        assert!(resolve_user("broken", PASSWD, GROUP).is_err());
    }

    #[test]
    fn out_of_range_ids_are_refused() {
        assert!(matches!(
            resolve_user("99999999999", "", ""),
            Err(UserError::OutOfRange { what: "uid", .. })
        ));
        assert!(matches!(
            resolve_user("0:2147483648", "", ""),
            Err(UserError::OutOfRange { what: "gid", .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        for spec in [":", "::", "a:b:c", ":0", "0:", "\u{0}", "-1", "+5", " 5"] {
            let _ = resolve_user(spec, "::::\n:x:\n\u{0}", ":::\n::::,,,");
        }
        assert_eq!(
            resolve_user(":0", PASSWD, GROUP),
            Ok(user(0, 0, &[], "/root"))
        );
    }
}
