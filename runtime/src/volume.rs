//! Volumes: directories `$KILN_ROOT/volumes/<name>/_data` recorded in the store.
//! A volume is filled from the image's content at its mount path the first time
//! it is mounted while empty, as docker does, and outlives its containers.

use std::path::{Path, PathBuf};

use kiln_cache::{Store, VolumeRecord};

use crate::error::{Error, Result};

/// `$KILN_ROOT/volumes/<name>`.
pub fn volume_dir(store: &Store, name: &str) -> PathBuf {
    store.root().join("volumes").join(name)
}

/// `$KILN_ROOT/volumes/<name>/_data`: what containers mount.
pub fn data_dir(store: &Store, name: &str) -> PathBuf {
    volume_dir(store, name).join("_data")
}

/// Docker's rule for volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("volume name `{name}`"),
            "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at least two characters",
        ))
    }
}

/// Creates the volume `name` (a no-op when it exists); returns its record.
pub fn create(store: &Store, name: &str, anonymous: bool) -> Result<VolumeRecord> {
    validate_name(name)?;
    let data = data_dir(store, name);
    fs_err::create_dir_all(&data).map_err(|e| Error::io("creating volume", &data, e))?;
    store.create_volume(name, anonymous)?;
    Ok(store.volume(name)?)
}

/// Every volume.
pub fn list(store: &Store) -> Result<Vec<VolumeRecord>> {
    Ok(store.volumes()?)
}

/// Removes a volume no container uses, and its data.
pub fn remove(store: &Store, name: &str) -> Result<()> {
    store.remove_volume(name)?;
    let dir = volume_dir(store, name);
    match fs_err::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing volume", dir, e)),
    }
}

/// Removes every volume no container uses (with `all`; else only anonymous
/// ones, as `docker volume prune`); returns their names.
pub fn prune(store: &Store, all: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for v in store.volumes()? {
        if !(all || v.anonymous) {
            continue;
        }
        if !store
            .lease_holders(kiln_cache::LeaseKind::Volume, &v.name)?
            .is_empty()
        {
            continue;
        }
        remove(store, &v.name)?;
        removed.push(v.name);
    }
    Ok(removed)
}

/// Fills an empty volume with what the image has at `target`, as docker
/// does on first use: the image's merged view there (every layer, whiteouts
/// and opaque directories applied), read through a read-only overlay of
/// `lowers` (top-most first) mounted in a scratch directory. A `target`
/// that is missing, not a directory, or reached through a symlink in the
/// image leaves the volume empty (nothing is followed out of the image).
pub(crate) fn fill_from_image(data: &Path, lowers: &[PathBuf], target: &str) -> Result<()> {
    let empty = fs_err::read_dir(data)
        .map_err(|e| Error::io("reading volume", data, e))?
        .next()
        .is_none();
    if !empty || lowers.is_empty() {
        return Ok(());
    }
    let parent = data.parent().unwrap_or(data);
    let scratch = tempfile::Builder::new()
        .prefix(".fill-")
        .tempdir_in(parent)
        .map_err(|e| Error::io("making a scratch directory", parent, e))?;
    let merged = scratch.path().join("m");
    let blank = scratch.path().join("e");
    for d in [&merged, &blank] {
        fs_err::create_dir(d).map_err(|e| Error::io("making a scratch directory", d, e))?;
    }
    let merged = merged.as_path();
    let mut opts = std::ffi::OsString::from("ro,lowerdir=");
    for (i, l) in lowers.iter().enumerate() {
        if i > 0 {
            opts.push(":");
        }
        opts.push(l.as_os_str());
    }
    if lowers.len() == 1 {
        // Without an upper, overlayfs wants two lower layers.
        opts.push(":");
        opts.push(blank.as_os_str());
    }
    // A lower that is still the upper of a RUN's sandbox being torn down
    // (a build that just exited leaves its helpers to finish).
    kiln_executor::wait_detached_using(lowers);
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let mounted = mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_os_str()),
    );
    if let Err(e) = mounted {
        return Err(Error::io(
            "mounting the image to fill a volume",
            merged,
            std::io::Error::from(e),
        ));
    }
    let result = (|| -> Result<()> {
        // Walk the target inside the image, following no symlink.
        let mut source = merged.to_path_buf();
        for comp in target.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                return Ok(());
            }
            source.push(comp);
            match fs_err::symlink_metadata(&source) {
                Ok(m) if m.is_dir() => {}
                _ => return Ok(()),
            }
        }
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", source.display()))
            .arg(data)
            .output()
            .map_err(|e| Error::io("running cp to fill the volume", data, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::invalid(
                format!("volume at `{target}`"),
                format!(
                    "copying the image's content failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ))
        }
    })();
    let _ = umount2(merged, MntFlags::MNT_DETACH);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_docker_rules() {
        for ok in ["data", "my-vol_1.x", "a1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "-x", "a/b", "x y", "../x"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
