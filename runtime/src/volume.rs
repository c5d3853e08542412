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

/// Copies the image's content at `target` into the volume's empty `data`
/// directory: from the top-most layer holding `target` as a directory.
pub(crate) fn fill_from_image(data: &Path, lowers: &[PathBuf], target: &str) -> Result<()> {
    let empty = fs_err::read_dir(data)
        .map_err(|e| Error::io("reading volume", data, e))?
        .next()
        .is_none();
    if !empty {
        return Ok(());
    }
    let rel = target.trim_start_matches('/');
    let Some(source) = lowers
        .iter()
        .map(|l| l.join(rel))
        .find(|p| fs_err::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
    else {
        return Ok(());
    };
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", source.display()))
        .arg(data)
        .output()
        .map_err(|e| Error::io("running cp to fill the volume", data, e))?;
    if !out.status.success() {
        return Err(Error::invalid(
            format!("volume at `{target}`"),
            format!(
                "copying the image's content from `{}` failed: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
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
