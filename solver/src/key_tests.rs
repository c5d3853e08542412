//! Key and miss-explanation tests.

use super::*;
use crate::context::BuildContext;
use crate::plan::{BuildOptions, EmptyImages, plan};

fn inputs() -> KeyInputs {
    KeyInputs {
        kind: "exec".into(),
        definition: r#"{"op":"exec","args":["make"]}"#.into(),
        instruction: Some("RUN make".into()),
        locator: Some(StepLocator {
            stage: "build".into(),
            index: Some(1),
            line: 3,
        }),
        parents: vec![ParentInput {
            key: CacheKey("sha256:p".into()),
            name: "[build 2/3] COPY . .".into(),
        }],
        vars: BTreeMap::from([("VERSION".to_owned(), "1".to_owned())]),
        image: None,
        files: BTreeMap::from([
            ("src/main.rs".to_owned(), "sha256:a".to_owned()),
            ("Cargo.toml".to_owned(), "sha256:b".to_owned()),
        ]),
        files_digest: Some("sha256:files".into()),
        content_hash: kiln_cache::CONTENT_ALGORITHM.to_owned(),
    }
}

#[test]
fn key_covers_definition_parents_and_files_only() {
    let a = inputs();
    assert_eq!(a.key(), inputs().key());
    assert!(a.key().0.starts_with("sha256:") && a.key().0.len() == 71);
    let mut b = inputs();
    b.definition.push(' ');
    assert_ne!(a.key(), b.key());
    let mut b = inputs();
    b.parents[0].key = CacheKey("sha256:q".into());
    assert_ne!(a.key(), b.key());
    let mut b = inputs();
    b.files_digest = Some("sha256:other".into());
    assert_ne!(a.key(), b.key());
    // Names and locations are for explanations, not the key.
    let mut b = inputs();
    b.parents[0].name = "renamed".into();
    b.locator = None;
    b.instruction = None;
    assert_eq!(a.key(), b.key());
}

#[test]
fn same_inputs_explain_nothing() {
    assert!(explain_miss(&inputs(), &inputs()).is_empty());
}

#[test]
fn instruction_change_is_named() {
    let mut cur = inputs();
    cur.instruction = Some("RUN make all".into());
    cur.definition = "x".into();
    let c = explain_miss(&inputs(), &cur);
    assert_eq!(
        c,
        [MissCause::InstructionChanged {
            before: "RUN make".into(),
            after: "RUN make all".into()
        }]
    );
    assert_eq!(
        c[0].to_string(),
        "instruction changed (`RUN make` -> `RUN make all`)"
    );
}

#[test]
fn arg_change_is_named_with_values() {
    let mut cur = inputs();
    cur.vars.insert("VERSION".into(), "2".into());
    cur.vars.insert("NEW".into(), "x".into());
    cur.definition = "changed by the args".into();
    let c = explain_miss(&inputs(), &cur);
    assert_eq!(
        c,
        [
            MissCause::ArgChanged {
                name: "NEW".into(),
                before: None,
                after: Some("x".into())
            },
            MissCause::ArgChanged {
                name: "VERSION".into(),
                before: Some("1".into()),
                after: Some("2".into())
            },
        ]
    );
    assert_eq!(c[1].to_string(), "ARG `VERSION` changed (`1` -> `2`)");
}

#[test]
fn file_changes_are_named() {
    let mut cur = inputs();
    cur.files.insert("src/main.rs".into(), "sha256:new".into());
    cur.files.remove("Cargo.toml");
    cur.files.insert("build.rs".into(), "sha256:c".into());
    let c = explain_miss(&inputs(), &cur);
    assert_eq!(
        c,
        [
            MissCause::FileAdded {
                path: "build.rs".into()
            },
            MissCause::FileChanged {
                path: "src/main.rs".into()
            },
            MissCause::FileRemoved {
                path: "Cargo.toml".into()
            },
        ]
    );
    assert_eq!(c[1].to_string(), "file `src/main.rs` changed");
}

#[test]
fn base_image_and_parent_changes_are_named() {
    let mut prev = inputs();
    prev.image = Some(("busybox".into(), Some("sha256:old".into())));
    let mut cur = prev.clone();
    cur.image = Some(("busybox".into(), Some("sha256:new".into())));
    assert_eq!(
        explain_miss(&prev, &cur),
        [MissCause::BaseImageChanged {
            reference: "busybox".into(),
            before: Some("sha256:old".into()),
            after: Some("sha256:new".into())
        }]
    );
    let mut cur = inputs();
    cur.parents[0].key = CacheKey("sha256:changed".into());
    assert_eq!(
        explain_miss(&inputs(), &cur),
        [MissCause::ParentChanged {
            name: "[build 2/3] COPY . .".into()
        }]
    );
    let mut cur = inputs();
    cur.definition = "env changed".into();
    assert_eq!(explain_miss(&inputs(), &cur), [MissCause::SettingsChanged]);
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d).expect("mkdir");
    }
    fs_err::write(&p, content).expect("write");
}

const DOCKERFILE: &str = "\
FROM busybox AS build
ARG VERSION=1
COPY Cargo.toml /src/
COPY src /src/src
RUN build $VERSION
FROM busybox
COPY --from=build /out /out
";

fn keys_for(ctx_dir: &Path, args: &[(&str, &str)]) -> (BuildGraph, Vec<VertexKey>) {
    let df = kiln_parser::parse(DOCKERFILE).expect("parses");
    let mut o = BuildOptions::default();
    for (k, v) in args {
        o.build_args.insert((*k).into(), (*v).into());
    }
    let g = plan(&df, &o, &EmptyImages).expect("plans");
    let mut ctx = BuildContext::new(ctx_dir, None);
    let keys = compute_keys(&g, Some(&mut ctx)).expect("keys");
    (g, keys)
}

fn by_name<'a>(g: &BuildGraph, keys: &'a [VertexKey], needle: &str) -> &'a VertexKey {
    keys.iter()
        .find(|k| g.graph[k.vertex].name.contains(needle))
        .unwrap_or_else(|| panic!("no vertex named like {needle}"))
}

#[test]
fn a_one_file_edit_misses_exactly_its_readers_and_names_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "Cargo.toml", "[package]");
    write(d.path(), "src/main.rs", "fn main() {}");
    write(d.path(), "src/lib.rs", "");
    let (g, before) = keys_for(d.path(), &[]);
    let (_, again) = keys_for(d.path(), &[]);
    let k = |ks: &[VertexKey]| ks.iter().map(|k| k.key.clone()).collect::<Vec<_>>();
    assert_eq!(k(&before), k(&again), "keys are deterministic");

    write(d.path(), "src/main.rs", "fn main() { loop {} }");
    let (_, after) = keys_for(d.path(), &[]);
    let same = |n: &str| by_name(&g, &before, n).key == by_name(&g, &after, n).key;
    assert!(same("COPY Cargo.toml"));
    assert!(!same("COPY src"));
    assert!(!same("RUN build"));
    assert!(!same("COPY --from=build"));
    let copy_src = by_name(&g, &after, "COPY src");
    assert_eq!(
        explain_miss(&by_name(&g, &before, "COPY src").inputs, &copy_src.inputs),
        [MissCause::FileChanged {
            path: "src/main.rs".into()
        }]
    );
    assert_eq!(
        explain_miss(
            &by_name(&g, &before, "RUN build").inputs,
            &by_name(&g, &after, "RUN build").inputs
        ),
        [MissCause::ParentChanged {
            name: "[build 4/5] COPY src /src/src".into()
        }]
    );
    assert!(copy_src.inputs.files.contains_key("src/lib.rs"));
    assert!(!copy_src.inputs.files.contains_key("Cargo.toml"));
}

#[test]
fn an_arg_change_misses_the_run_and_names_the_arg() {
    let d = tempfile::tempdir().expect("tempdir");
    write(d.path(), "Cargo.toml", "[package]");
    write(d.path(), "src/main.rs", "");
    let (g, one) = keys_for(d.path(), &[]);
    let (_, two) = keys_for(d.path(), &[("VERSION", "2")]);
    assert_eq!(
        by_name(&g, &one, "COPY Cargo.toml").key,
        by_name(&g, &two, "COPY Cargo.toml").key,
        "a COPY that does not use the ARG keeps its key"
    );
    let causes = explain_miss(
        &by_name(&g, &one, "RUN build").inputs,
        &by_name(&g, &two, "RUN build").inputs,
    );
    assert_eq!(
        causes,
        [MissCause::ArgChanged {
            name: "VERSION".into(),
            before: Some("1".into()),
            after: Some("2".into())
        }]
    );
}

#[test]
fn identical_stages_share_keys() {
    let df = kiln_parser::parse("FROM busybox AS a\nRUN echo hi\nFROM busybox AS b\nRUN echo hi\nFROM scratch\nCOPY --from=a / /a\nCOPY --from=b / /b\n")
        .expect("parses");
    let g = plan(&df, &BuildOptions::default(), &EmptyImages).expect("plans");
    let keys = compute_keys(&g, None).expect("keys");
    let runs: Vec<&CacheKey> = keys
        .iter()
        .filter(|k| matches!(g.graph[k.vertex].op, Op::Exec(_)))
        .map(|k| &k.key)
        .collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn key_history_explains_the_next_build() {
    let store = tempfile::tempdir().expect("store");
    let d = tempfile::tempdir().expect("ctx");
    write(d.path(), "Cargo.toml", "[package]");
    write(d.path(), "src/main.rs", "");
    let (g, first) = keys_for(d.path(), &[]);
    let mut h = KeyHistory::open(store.path(), "Dockerfile@ctx").expect("open");
    let run = by_name(&g, &first, "RUN build");
    assert_eq!(
        h.explain(&run.inputs).expect("explain"),
        [MissCause::FirstBuild]
    );
    h.record(first.iter().map(|k| &k.inputs)).expect("record");
    assert_eq!(
        h.explain(&run.inputs).expect("explain"),
        [MissCause::RecordMissing]
    );
    write(d.path(), "Cargo.toml", "[package] # edited");
    let (_, second) = keys_for(d.path(), &[]);
    let h = KeyHistory::open(store.path(), "Dockerfile@ctx").expect("reopen");
    assert_eq!(
        h.explain(&by_name(&g, &second, "COPY Cargo.toml").inputs)
            .expect("explain"),
        [MissCause::FileChanged {
            path: "Cargo.toml".into()
        }]
    );
    // Another scope knows nothing.
    let other = KeyHistory::open(store.path(), "other").expect("open");
    assert_eq!(
        other.explain(&run.inputs).expect("explain"),
        [MissCause::FirstBuild]
    );
}

#[test]
fn an_env_change_is_named_for_a_run() {
    let d = tempfile::tempdir().expect("tempdir");
    let keys = |env: &str| {
        let df = kiln_parser::parse(&format!(
            "FROM busybox\nARG A=1\nENV MODE={env}\nRUN make\n"
        ))
        .expect("parses");
        let g = plan(&df, &BuildOptions::default(), &EmptyImages).expect("plans");
        let mut ctx = BuildContext::new(d.path(), None);
        let k = compute_keys(&g, Some(&mut ctx)).expect("keys");
        let run = k
            .into_iter()
            .find(|k| matches!(g.graph[k.vertex].op, Op::Exec(_)))
            .expect("run");
        run.inputs
    };
    let causes = explain_miss(&keys("debug"), &keys("release"));
    assert_eq!(
        causes,
        [MissCause::EnvChanged {
            name: "MODE".into(),
            before: Some("debug".into()),
            after: Some("release".into())
        }]
    );
    assert_eq!(
        causes[0].to_string(),
        "ENV `MODE` changed (`debug` -> `release`)"
    );
}

#[test]
fn history_rows_are_compact_and_older_json_rows_still_read() {
    let mut i = inputs();
    // Digest-like values: the leading digits differ, as sha256's do.
    let digest = |n: u64| {
        format!(
            "sha256:{:016x}{:048x}",
            n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            n
        )
    };
    for n in 0..2000u64 {
        i.files
            .insert(format!("src/mod{}/file{n}.c", n % 50), digest(n));
    }
    let plain = serde_json::to_vec(&i).expect("json");
    let row = history_row(&i).expect("row");
    assert!(
        row.len() * 4 < plain.len(),
        "{} vs {}",
        row.len(),
        plain.len()
    );
    let back =
        parse_history_row(rusqlite::types::ValueRef::Blob(&row)).expect("compressed row reads");
    assert_eq!(back.files.len(), i.files.len());
    // Shortened digests still compare equal to full ones, and differ from
    // other digests.
    for (p, d) in &i.files {
        assert!(same_digest(&back.files[p], d), "{p}");
    }
    assert!(!same_digest(&back.files["src/mod0/file0.c"], &digest(1)));
    assert!(explain_miss(&back, &i).is_empty());
    // A row written before compression (plain JSON text).
    let old = parse_history_row(rusqlite::types::ValueRef::Text(&plain)).expect("json row");
    assert_eq!(old, i);
}

fn with_files(n: usize, changed: Option<usize>) -> KeyInputs {
    let mut i = inputs();
    i.files = (0..n)
        .map(|k| {
            let v = if changed == Some(k) { k + 1_000_000 } else { k };
            (
                format!("src/mod{}/file{k}.c", k % 40),
                // The leading digits differ, as sha256's do.
                format!(
                    "sha256:{:016x}{:048x}",
                    (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    v
                ),
            )
        })
        .collect();
    i
}

fn bucket_rows(h: &KeyHistory) -> i64 {
    h.db.conn()
        .query_row("SELECT count(*) FROM key_history3_files", [], |r| r.get(0))
        .expect("count")
}

#[test]
fn a_one_file_change_rewrites_one_bucket_and_is_named() {
    let store = tempfile::tempdir().expect("store");
    let mut h = KeyHistory::open(store.path(), "scope").expect("open");
    let base = with_files(5000, None);
    h.record([&base]).expect("record");
    let n = bucket_rows(&h);
    assert_eq!(n, 64);
    // The same inputs again: nothing written.
    let before = h.db.conn().total_changes();
    h.record([&base]).expect("record");
    assert_eq!(h.db.conn().total_changes(), before);
    assert_eq!(
        h.explain(&base).expect("explain"),
        [MissCause::RecordMissing]
    );
    // One file changed: one bucket row rewritten.
    let edited = with_files(5000, Some(1234));
    assert_eq!(
        h.explain(&edited).expect("explain"),
        [MissCause::FileChanged {
            path: "src/mod34/file1234.c".into()
        }]
    );
    let before = h.db.conn().total_changes();
    h.record([&edited]).expect("record");
    // (The step's row, with its bucket hashes, and one bucket.)
    assert_eq!(h.db.conn().total_changes() - before, 2);
    // The full previous inputs still read back.
    let loc = base.locator.clone().expect("locator");
    let prev = h.previous(&loc).expect("previous").expect("row");
    assert_eq!(prev.files.len(), 5000);
    assert!(explain_miss(&prev, &edited).is_empty());
    // Files added and removed, across a change of the bucket count.
    let mut fewer = with_files(100, None);
    fewer.files.insert("new.txt".into(), "sha256:00".into());
    let causes = h.explain(&fewer).expect("explain");
    assert_eq!(causes.len(), 4900 + 1);
    assert_eq!(
        causes[0],
        MissCause::FileAdded {
            path: "new.txt".into()
        }
    );
    assert!(
        causes[1..]
            .iter()
            .all(|c| matches!(c, MissCause::FileRemoved { .. }))
    );
    h.record([&fewer]).expect("record");
    assert_eq!(bucket_rows(&h), 1);
    assert_eq!(
        h.explain(&fewer).expect("explain"),
        [MissCause::RecordMissing]
    );
    // No files at all.
    let mut none = inputs();
    none.files.clear();
    h.record([&none]).expect("record");
    assert_eq!(bucket_rows(&h), 0);
    assert_eq!(
        h.explain(&none).expect("explain"),
        [MissCause::RecordMissing]
    );
}

#[test]
fn a_key_history_row_of_an_older_kiln_still_explains() {
    let store = tempfile::tempdir().expect("store");
    // (Older kilns hashed contents with sha256 and wrote no `content_hash`.)
    let mut old = with_files(300, None);
    old.content_hash = String::new();
    {
        // The table and row as kiln wrote them before the file buckets.
        let conn = rusqlite::Connection::open(store.path().join("statcache.db")).expect("db");
        conn.execute_batch(
            "CREATE TABLE key_history2 (
                scope TEXT NOT NULL, stage TEXT NOT NULL, idx INTEGER NOT NULL,
                line INTEGER NOT NULL, inputs BLOB NOT NULL,
                PRIMARY KEY (scope, stage, idx)
            );",
        )
        .expect("schema");
        conn.execute(
            "INSERT INTO key_history2 VALUES ('scope', 'build', 1, 3, ?1)",
            [history_row(&old).expect("row")],
        )
        .expect("insert");
    }
    let mut h = KeyHistory::open(store.path(), "scope").expect("open");
    let edited = with_files(300, Some(7));
    // Its file digests are not comparable with today's.
    assert_eq!(
        h.explain(&edited).expect("explain"),
        [MissCause::ContentHashChanged]
    );
    // Recorded in the new tables, which win from then on.
    h.record([&edited]).expect("record");
    assert_eq!(
        h.explain(&edited).expect("explain"),
        [MissCause::RecordMissing]
    );
    // A damaged bucket is as good as no history.
    h.db.conn()
        .execute("UPDATE key_history3_files SET files = x'00'", [])
        .expect("damage");
    assert_eq!(
        h.explain(&with_files(300, None)).expect("explain"),
        [MissCause::FirstBuild]
    );
}

#[test]
fn a_step_last_built_with_another_content_hash_is_not_said_to_have_changed_files() {
    let store = tempfile::tempdir().expect("store");
    let mut h = KeyHistory::open(store.path(), "scope").expect("open");
    // As a kiln from before BLAKE3 content digests recorded them: a step
    // that reads files, and one that reads none.
    let mut copy = with_files(50, None);
    copy.content_hash = String::new();
    let mut run = inputs();
    run.files.clear();
    run.files_digest = None;
    run.locator = Some(StepLocator {
        stage: "build".into(),
        index: Some(2),
        line: 4,
    });
    run.content_hash = String::new();
    h.record([&copy, &run]).expect("record");
    // Today's digests of the same files differ: not "file changed".
    let mut copy_now = with_files(50, Some(3));
    assert_eq!(copy_now.content_hash, kiln_cache::CONTENT_ALGORITHM);
    assert_eq!(
        h.explain(&copy_now).expect("explain"),
        [MissCause::ContentHashChanged]
    );
    assert_eq!(
        MissCause::ContentHashChanged.to_string(),
        "built before by an older kiln, which hashed file contents another way"
    );
    // A step that reads no files compares as before.
    let mut run_now = run.clone();
    run_now.content_hash = kiln_cache::CONTENT_ALGORITHM.to_owned();
    assert_eq!(
        h.explain(&run_now).expect("explain"),
        [MissCause::RecordMissing]
    );
    // Recorded by today's kiln: files compare again.
    copy_now = with_files(50, None);
    copy_now.files_digest = Some("sha256:files-now".into());
    h.record([&copy_now]).expect("record");
    let edited = with_files(50, Some(9));
    assert_eq!(
        h.explain(&edited).expect("explain"),
        [MissCause::FileChanged {
            path: "src/mod9/file9.c".into()
        }]
    );
}

#[test]
fn one_shared_connection_serves_the_stat_cache_the_history_and_the_memo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = crate::context::CacheDb::open(dir.path()).expect("open");
    let stats = crate::context::StatCache::with_db(db.clone()).expect("stat cache");
    let history = KeyHistory::with_db(db.clone(), "scope").expect("history");
    let memo = ContentMemo::with_db(db.clone()).expect("memo");
    memo.put("id", "sha256:aa").expect("put");
    assert_eq!(memo.get("id").expect("get").as_deref(), Some("sha256:aa"));
    // All three see one database: the memo's table is in the history's.
    let tables: i64 = history
        .db
        .conn()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN
             ('content_digest', 'key_history3', 'stat_parts')",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(tables, 3);
    drop((stats, history, memo, db));
    // What was written is there for the next build's own connection.
    let again = ContentMemo::open(dir.path()).expect("reopen");
    assert_eq!(again.get("id").expect("get").as_deref(), Some("sha256:aa"));
}

/// Two builds finishing at once: one records its history while the other
/// holds statcache.db's write lock. The record waits for the lock (the
/// busy timeout) instead of failing with "database is locked", which a
/// transaction that read before it wrote did at once.
#[test]
fn recording_waits_for_another_builds_write() {
    let store = tempfile::tempdir().expect("store");
    let mut h = KeyHistory::open(store.path(), "scope").expect("open");
    h.record([&inputs()]).expect("first record");
    let other = crate::context::open_cache_db(&store.path().join("statcache.db")).expect("open");
    other.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.execute_batch("COMMIT").expect("commit");
    });
    let mut changed = inputs();
    changed.definition = r#"{"op":"exec","args":["make","all"]}"#.into();
    let started = std::time::Instant::now();
    h.record([&changed]).expect("record beside another writer");
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    holder.join().expect("holder");
    let again = KeyHistory::open(store.path(), "scope").expect("reopen");
    assert_eq!(
        again.explain(&changed).expect("explain"),
        [MissCause::RecordMissing]
    );
}
