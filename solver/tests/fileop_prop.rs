//! Property tests: whatever symlinks a destination root holds and whatever
//! path a COPY names, resolution stays in the root and nothing is written
//! beside it.

use std::os::unix::fs::symlink;

use kiln_solver::fileop::{self, CopyOp, resolve_in_root};
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("l1".to_owned()),
        Just("l2".to_owned()),
        Just("l3".to_owned()),
    ]
}

fn path() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(segment(), 0..6)).prop_map(|(abs, segs)| {
        let p = segs.join("/");
        if abs { format!("/{p}") } else { p }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn resolution_and_copies_stay_in_the_root(
        links in prop::collection::vec(path(), 3),
        dest in path(),
        trailing in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let src = tmp.path().join("src");
        let outside = tmp.path().join("outside");
        for d in [&root, &src, &outside] {
            fs_err::create_dir(d).unwrap();
        }
        fs_err::create_dir_all(root.join("a/b")).unwrap();
        for (i, target) in links.iter().enumerate() {
            // Some links point at the host's `outside` directory itself.
            let target = if target.is_empty() { outside.display().to_string() } else { target.clone() };
            let at = if i == 2 { root.join("a/l3") } else { root.join(format!("l{}", i + 1)) };
            symlink(&target, at).unwrap();
        }
        fs_err::write(src.join("f"), "F").unwrap();
        fs_err::create_dir(src.join("d")).unwrap();
        fs_err::write(src.join("d/g"), "G").unwrap();

        let resolved = resolve_in_root(&root, &dest, true);
        if let Ok(p) = &resolved {
            prop_assert!(p.starts_with(&root), "{} left the root", p.display());
        }
        let dest = if trailing { format!("{dest}/") } else { dest };
        for s in ["f", "d"] {
            let mut op = CopyOp::new([s], &dest);
            op.workdir = "/a".into();
            op.apply_ownership = false;
            // Errors (a file in the way, a loop) are fine; escapes are not.
            let _ = fileop::copy(&src, &root, &op);
        }
        let _ = fileop::mkdir_workdir(&root, &format!("/{dest}/w"), None, None, false);
        let leaked: Vec<_> = fs_err::read_dir(&outside).unwrap().collect();
        prop_assert!(leaked.is_empty(), "wrote outside the root: {leaked:?}");
        let beside: Vec<_> = fs_err::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        prop_assert_eq!(beside.len(), 3, "{:?}", beside);
    }
}
