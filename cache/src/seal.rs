//! A seal on the store's database: a few `stat` fields and the WAL's header,
//! read without opening SQLite, that change whenever a transaction commits.
//!
//! In WAL mode a commit writes its pages to `meta.db-wal`: after the last
//! valid frame (the file's times change, and usually its size), or, after a
//! checkpoint emptied the log, from its start again under a new random salt
//! in the 32-byte header. A checkpoint writes `meta.db` (its times change).
//! So an unchanged seal means an unchanged database, with one caveat: file
//! times tick coarsely (a few ms), so a commit in the same tick as the seal
//! was taken could leave it as it was. [`DbSeal::settled`] tells whether the
//! last change is older than that; only a settled seal vouches for anything.
//!
//! A fully cached rebuild (see the build memo in the CLI) answers from a
//! record vouched for by a seal, without opening the database: ~1 ms of a
//! ~2 ms command.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Changes this old (ns) or older are past the file-time granularity.
const SETTLE_NS: i128 = 20_000_000;

/// See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSeal {
    /// Device, inode, size, mtime (ns) of `meta.db`, then of `meta.db-wal`
    /// (zeros when there is none). Not the ctime: SQLite, run as root,
    /// `fchown`s the WAL to the database's owner at every open.
    files: [[i128; 4]; 2],
    /// The WAL's header (hex; empty without a WAL).
    wal_header: String,
}

impl DbSeal {
    /// The seal of the database of the store at `root`; `None` when it
    /// cannot be read (no database).
    pub fn of(root: &Path) -> Option<DbSeal> {
        let db = fs_err::metadata(root.join("meta.db")).ok()?;
        let wal_path = root.join("meta.db-wal");
        let (wal, wal_header) = match fs_err::File::open(&wal_path) {
            Ok(mut f) => {
                let m = f.file().metadata().ok()?;
                let mut header = [0u8; 32];
                let n = read_up_to(&mut f, &mut header)?;
                (stamp(&m), hex(&header[..n]))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ([0; 4], String::new()),
            Err(_) => return None,
        };
        Some(DbSeal {
            files: [stamp(&db), wal],
            wal_header,
        })
    }

    /// Whether the last change the seal shows is older than the file-time
    /// granularity at `now_ns` (ns since the epoch).
    pub fn settled(&self, now_ns: i128) -> bool {
        let last = self.files.iter().map(|f| f[3]).max().unwrap_or(0);
        now_ns - last >= SETTLE_NS
    }
}

fn stamp(m: &std::fs::Metadata) -> [i128; 4] {
    [
        i128::from(m.dev()),
        i128::from(m.ino()),
        i128::from(m.len()),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ]
}

fn read_up_to(f: &mut fs_err::File, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit after a settled seal changes it: also one that rewrites a
    /// row with a value of the same size, and one after a checkpoint
    /// restarted the log.
    #[test]
    fn a_commit_after_a_settled_seal_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(dir.path()).unwrap();
        let rec = |n: u8| crate::CacheResult {
            diff_ids: Vec::new(),
            config: None,
            extra: serde_json::json!({ "n": n }),
        };
        let mut seals = vec![DbSeal::of(dir.path()).unwrap()];
        for i in 0..16u8 {
            let before = seals.last().unwrap().clone();
            while !before.settled(now_ns()) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // The same key each time: the same page, the same size.
            store.put_cache_record("seal-test", &rec(i % 4)).unwrap();
            if i % 4 == 3 {
                let conn = store.db();
                conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE);")
                    .unwrap();
            }
            let seal = DbSeal::of(dir.path()).unwrap();
            assert_ne!(seal, before, "commit {i} left the seal as it was");
            seals.push(seal);
        }
        // Reading changes nothing, nor does opening the store again.
        let last = DbSeal::of(dir.path()).unwrap();
        store.peek_cache_record("seal-test").unwrap();
        drop(store);
        let store = crate::Store::open(dir.path()).unwrap();
        store.peek_cache_record("seal-test").unwrap();
        assert_eq!(DbSeal::of(dir.path()).unwrap(), last);
        assert!(!last.settled(now_ns()), "just written");
        assert!(last.settled(now_ns() + SETTLE_NS));
    }
}
