//! The per-network hosts file: every container on a network bind-mounts it as
//! `/etc/hosts`, so it is rewritten in place (same inode) on every attach and detach.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use super::{NetworkError, NetworkState};

/// The text of the hosts file for the network's current endpoints.
pub(crate) fn render(state: &NetworkState) -> String {
    let mut out = String::from(
        "127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         ff00::0\tip6-mcastprefix\n\
         ff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    out.push_str(&format!(
        "# kiln network `{}`: rewritten on every attach and detach\n",
        state.name
    ));
    let mut endpoints: Vec<_> = state.endpoints.iter().collect();
    endpoints.sort_by_key(|(_, e)| e.ip);
    for (id, e) in endpoints {
        let mut names: Vec<&str> = Vec::new();
        for n in std::iter::once(e.name.as_str())
            .chain(e.aliases.iter().map(String::as_str))
            .chain(std::iter::once(id.get(..12).unwrap_or(id)))
        {
            if !n.is_empty() && !names.contains(&n) {
                names.push(n);
            }
        }
        out.push_str(&format!("{}\t{}\n", e.ip, names.join(" ")));
    }
    out
}

/// Rewrites `path` in place: containers hold bind mounts of this very inode, so the
/// file is never replaced, only overwritten and truncated.
pub(crate) fn write_in_place(path: &Path, text: &str) -> Result<(), NetworkError> {
    let mut f = fs_err::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(text.as_bytes())?;
    // No fsync: the file is made again from the state on every change.
    f.set_len(text.len() as u64)?;
    Ok(())
}
