//! Containers, volumes and leases in the store's database (schema version 2).
//!
//! The store keeps the records; what a container *is* (its run configuration,
//! serialized as JSON in `config`) belongs to `kiln-runtime`. A **lease** says
//! that a holder (`container:<id>`) uses an image, a layer or a volume: GC keeps
//! leased images and layers (and their snapshots), and a leased volume cannot be
//! removed.

use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use crate::error::{Result, StoreError};
use crate::store::Store;

/// Migration to schema version 2.
pub(crate) const MIGRATION_2: &str = r"
    CREATE TABLE containers (
        id TEXT PRIMARY KEY,            -- 64 hex digits
        name TEXT NOT NULL UNIQUE,
        image TEXT NOT NULL,            -- image id (config digest)
        image_name TEXT NOT NULL,       -- the image as the user named it
        config TEXT NOT NULL,           -- JSON, owned by kiln-runtime
        state TEXT NOT NULL,            -- created | running | exited
        pid INTEGER,                    -- host pid of the container's PID 1 while running
        supervisor INTEGER,             -- pid of the process waiting for it
        exit_code INTEGER,
        oom_killed INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        restarts INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL,       -- unix time, nanoseconds
        started INTEGER,
        finished INTEGER
    );
    CREATE TABLE volumes (
        name TEXT PRIMARY KEY,
        anonymous INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL
    );
    CREATE TABLE leases (
        holder TEXT NOT NULL,           -- `container:<id>`
        kind TEXT NOT NULL,             -- image | layer | volume
        target TEXT NOT NULL,
        PRIMARY KEY (holder, kind, target)
    );
    CREATE INDEX leases_target ON leases(kind, target);
";

/// A lease kind: what the holder uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// An image id (`sha256:...`).
    Image,
    /// A layer diffID (its snapshot stays too).
    Layer,
    /// A volume name.
    Volume,
}

impl LeaseKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Layer => "layer",
            Self::Volume => "volume",
        }
    }
}

/// One container as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    /// 64 hex digits.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// The image id.
    pub image: String,
    /// The image as given on the command line.
    pub image_name: String,
    /// The runtime's configuration, JSON.
    pub config: String,
    /// `created`, `running` or `exited`.
    pub state: String,
    /// Host pid of the container's PID 1 while running.
    pub pid: Option<u32>,
    /// Pid of the process that waits for the container (kiln or its supervisor).
    pub supervisor: Option<u32>,
    /// The last exit code.
    pub exit_code: Option<i32>,
    /// The last run ended in an OOM kill.
    pub oom_killed: bool,
    /// Why the last start failed.
    pub error: Option<String>,
    /// How often the restart policy restarted it.
    pub restarts: u32,
    /// Creation time, unix nanoseconds.
    pub created: i64,
    /// Last start, unix nanoseconds.
    pub started: Option<i64>,
    /// Last exit, unix nanoseconds.
    pub finished: Option<i64>,
}

impl ContainerRecord {
    /// A container just created (state `created`, never started), made at
    /// `created` (unix nanoseconds).
    pub fn created(
        id: String,
        name: String,
        image: String,
        image_name: String,
        config: String,
        created: i64,
    ) -> Self {
        Self {
            id,
            name,
            image,
            image_name,
            config,
            state: "created".to_owned(),
            pid: None,
            supervisor: None,
            exit_code: None,
            oom_killed: false,
            error: None,
            restarts: 0,
            created,
            started: None,
            finished: None,
        }
    }
}

/// One volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The name (64 hex digits for anonymous volumes).
    pub name: String,
    /// Made for an image's `VOLUME` without a name.
    pub anonymous: bool,
    /// Creation time, unix seconds.
    pub created: i64,
}

const COLUMNS: &str = "id, name, image, image_name, config, state, pid, supervisor, exit_code, \
                       oom_killed, error, restarts, created, started, finished";

fn container_row(r: &Row<'_>) -> rusqlite::Result<ContainerRecord> {
    Ok(ContainerRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        image: r.get(2)?,
        image_name: r.get(3)?,
        config: r.get(4)?,
        state: r.get(5)?,
        pid: r.get(6)?,
        supervisor: r.get(7)?,
        exit_code: r.get(8)?,
        oom_killed: r.get(9)?,
        error: r.get(10)?,
        restarts: r.get(11)?,
        created: r.get(12)?,
        started: r.get(13)?,
        finished: r.get(14)?,
    })
}

fn holder(id: &str) -> String {
    format!("container:{id}")
}

impl Store {
    /// Records a new container and its leases in one transaction. Fails with
    /// [`StoreError::Conflict`] when the name is taken.
    pub fn create_container(
        &self,
        rec: &ContainerRecord,
        leases: &[(LeaseKind, String)],
    ) -> Result<()> {
        let mut conn = self.db();
        let e = self.db_err("recording container");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        let taken: Option<String> = tx
            .query_row(
                "SELECT id FROM containers WHERE name = ?1",
                [&rec.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(&e)?;
        if let Some(other) = taken {
            return Err(StoreError::Conflict {
                message: format!(
                    "the container name \"/{}\" is already in use by container \"{other}\"; remove (or rename) that container to reuse the name",
                    rec.name
                ),
            });
        }
        tx.execute(
            &format!("INSERT INTO containers ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
            params![
                rec.id,
                rec.name,
                rec.image,
                rec.image_name,
                rec.config,
                rec.state,
                rec.pid,
                rec.supervisor,
                rec.exit_code,
                rec.oom_killed,
                rec.error,
                rec.restarts,
                rec.created,
                rec.started,
                rec.finished
            ],
        )
        .map_err(&e)?;
        for (kind, target) in leases {
            tx.execute(
                "INSERT OR IGNORE INTO leases (holder, kind, target) VALUES (?1, ?2, ?3)",
                params![holder(&rec.id), kind.as_str(), target],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// Writes the mutable fields of a container (state, pids, exit, times).
    pub fn update_container(&self, rec: &ContainerRecord) -> Result<()> {
        let n = self
            .db()
            .execute(
                "UPDATE containers SET state = ?2, pid = ?3, supervisor = ?4, exit_code = ?5,
                 oom_killed = ?6, error = ?7, restarts = ?8, started = ?9, finished = ?10,
                 config = ?11 WHERE id = ?1",
                params![
                    rec.id,
                    rec.state,
                    rec.pid,
                    rec.supervisor,
                    rec.exit_code,
                    rec.oom_killed,
                    rec.error,
                    rec.restarts,
                    rec.started,
                    rec.finished,
                    rec.config
                ],
            )
            .map_err(self.db_err("updating container"))?;
        if n == 0 {
            return Err(StoreError::NoSuch {
                kind: "container",
                name: rec.id.clone(),
            });
        }
        Ok(())
    }

    /// Finds a container by name, full id or unique id prefix.
    pub fn container(&self, name_or_id: &str) -> Result<ContainerRecord> {
        let conn = self.db();
        let e = self.db_err("looking up container");
        let name = name_or_id.strip_prefix('/').unwrap_or(name_or_id);
        let by_name = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM containers WHERE name = ?1 OR id = ?1"),
                [name],
                container_row,
            )
            .optional()
            .map_err(&e)?;
        if let Some(rec) = by_name {
            return Ok(rec);
        }
        let no_such = || StoreError::NoSuch {
            kind: "container",
            name: name_or_id.to_owned(),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(no_such());
        }
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM containers WHERE id >= ?1 AND id < ?2 LIMIT 2"
            ))
            .map_err(&e)?;
        let found: Vec<ContainerRecord> = st
            .query_map([name.to_owned(), format!("{name}\u{7f}")], container_row)
            .and_then(Iterator::collect)
            .map_err(&e)?;
        match <[ContainerRecord; 1]>::try_from(found) {
            Ok([one]) => Ok(one),
            Err(v) if v.is_empty() => Err(no_such()),
            Err(_) => Err(StoreError::Conflict {
                message: format!("container id prefix `{name}` matches several containers"),
            }),
        }
    }

    /// Every container, newest first.
    pub fn containers(&self) -> Result<Vec<ContainerRecord>> {
        let conn = self.db();
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM containers ORDER BY created DESC"
            ))
            .map_err(self.db_err("listing containers"))?;
        st.query_map([], container_row)
            .and_then(Iterator::collect)
            .map_err(self.db_err("listing containers"))
    }

    /// Deletes a container's record and its leases.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut conn = self.db();
        let e = self.db_err("removing container");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        tx.execute("DELETE FROM leases WHERE holder = ?1", [holder(id)])
            .map_err(&e)?;
        tx.execute("DELETE FROM containers WHERE id = ?1", [id])
            .map_err(&e)?;
        tx.commit().map_err(&e)
    }

    // ------------------------------------------------------------ volumes

    /// Records a volume; returns false when it already existed.
    pub fn create_volume(&self, name: &str, anonymous: bool) -> Result<bool> {
        let n = self
            .db()
            .execute(
                "INSERT OR IGNORE INTO volumes (name, anonymous, created) VALUES (?1, ?2, ?3)",
                params![name, anonymous, crate::store::now()],
            )
            .map_err(self.db_err("recording volume"))?;
        Ok(n == 1)
    }

    /// One volume.
    pub fn volume(&self, name: &str) -> Result<VolumeRecord> {
        self.db()
            .query_row(
                "SELECT name, anonymous, created FROM volumes WHERE name = ?1",
                [name],
                |r| {
                    Ok(VolumeRecord {
                        name: r.get(0)?,
                        anonymous: r.get(1)?,
                        created: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.db_err("looking up volume"))?
            .ok_or_else(|| StoreError::NoSuch {
                kind: "volume",
                name: name.to_owned(),
            })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let conn = self.db();
        let mut st = conn
            .prepare("SELECT name, anonymous, created FROM volumes ORDER BY name")
            .map_err(self.db_err("listing volumes"))?;
        st.query_map([], |r| {
            Ok(VolumeRecord {
                name: r.get(0)?,
                anonymous: r.get(1)?,
                created: r.get(2)?,
            })
        })
        .and_then(Iterator::collect)
        .map_err(self.db_err("listing volumes"))
    }

    /// Ids of the containers holding a lease on `target`.
    pub fn lease_holders(&self, kind: LeaseKind, target: &str) -> Result<Vec<String>> {
        let conn = self.db();
        let mut st = conn
            .prepare("SELECT holder FROM leases WHERE kind = ?1 AND target = ?2 ORDER BY holder")
            .map_err(self.db_err("reading leases"))?;
        let holders: Vec<String> = st
            .query_map(params![kind.as_str(), target], |r| r.get(0))
            .and_then(Iterator::collect)
            .map_err(self.db_err("reading leases"))?;
        Ok(holders
            .into_iter()
            .map(|h| h.strip_prefix("container:").unwrap_or(&h).to_owned())
            .collect())
    }

    /// Forgets a volume (its directory is the caller's). Fails with
    /// [`StoreError::Conflict`] while a container uses it.
    pub fn remove_volume(&self, name: &str) -> Result<()> {
        let users = self.lease_holders(LeaseKind::Volume, name)?;
        if let Some(user) = users.first() {
            return Err(StoreError::Conflict {
                message: format!(
                    "remove {name}: volume is in use - [{}]",
                    user.get(..12).unwrap_or(user)
                ),
            });
        }
        let n = self
            .db()
            .execute("DELETE FROM volumes WHERE name = ?1", [name])
            .map_err(self.db_err("removing volume"))?;
        if n == 0 {
            return Err(StoreError::NoSuch {
                kind: "volume",
                name: name.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, name: &str) -> ContainerRecord {
        ContainerRecord::created(
            id.to_owned(),
            name.to_owned(),
            "sha256:00".to_owned(),
            "busybox".to_owned(),
            "{}".to_owned(),
            1,
        )
    }

    #[test]
    fn containers_by_name_id_prefix_and_leases_guard_volumes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let a = rec("abc123", "first");
        store
            .create_container(&a, &[(LeaseKind::Volume, "data".into())])
            .unwrap();
        store
            .create_container(&rec("abd456", "second"), &[])
            .unwrap();
        let dup = store.create_container(&rec("fff", "first"), &[]);
        assert!(matches!(dup, Err(StoreError::Conflict { .. })), "{dup:?}");
        assert_eq!(store.container("first").unwrap().id, "abc123");
        assert_eq!(store.container("/second").unwrap().id, "abd456");
        assert_eq!(store.container("abc").unwrap().name, "first");
        assert!(matches!(
            store.container("ab"),
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            store.container("zzz"),
            Err(StoreError::NoSuch { .. })
        ));
        let mut running = a.clone();
        running.state = "running".into();
        running.pid = Some(42);
        store.update_container(&running).unwrap();
        assert_eq!(store.container("first").unwrap(), running);
        assert_eq!(store.containers().unwrap().len(), 2);

        assert!(store.create_volume("data", false).unwrap());
        assert!(!store.create_volume("data", false).unwrap());
        let busy = store.remove_volume("data").unwrap_err().to_string();
        assert!(busy.contains("in use"), "{busy}");
        store.remove_container("abc123").unwrap();
        store.remove_volume("data").unwrap();
        assert!(store.volumes().unwrap().is_empty());
        assert!(matches!(
            store.remove_volume("data"),
            Err(StoreError::NoSuch { .. })
        ));
    }
}
