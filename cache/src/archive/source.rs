//! Random access to the files of an archive: a tar file (indexed once) or
//! a directory.

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::error::{Result, StoreError};

/// Largest JSON document read from an archive (manifests, configs, index).
const MAX_JSON: u64 = 64 << 20;

#[derive(Debug)]
pub(crate) enum Source {
    Tar {
        path: PathBuf,
        entries: HashMap<String, (u64, u64)>,
        links: HashMap<String, String>,
    },
    Dir {
        path: PathBuf,
    },
}

/// `./a//b/` → `a/b`; `None` for names that leave the archive.
fn clean(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

impl Source {
    pub(crate) fn open(path: &Path) -> Result<Source> {
        let meta = fs_err::metadata(path).map_err(|e| StoreError::io("reading", path, e))?;
        if meta.is_dir() {
            return Ok(Source::Dir {
                path: path.to_owned(),
            });
        }
        let file =
            fs_err::File::open(path).map_err(|e| StoreError::io("opening archive", path, e))?;
        let mut archive = tar::Archive::new(io::BufReader::new(file));
        let mut entries = HashMap::new();
        let mut links = HashMap::new();
        let bad = |e: io::Error| StoreError::UnknownFormat {
            path: path.to_owned(),
            reason: format!("it is not a readable tar: {e}"),
        };
        for entry in archive.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let raw = entry.path_bytes();
            let Some(name) = std::str::from_utf8(&raw).ok().and_then(clean) else {
                continue;
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    entries.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Ok(Some(target)) = entry.link_name() {
                        let target = target.to_string_lossy().into_owned();
                        let resolved = if entry.header().entry_type() == tar::EntryType::Symlink {
                            // Relative to the link's directory.
                            match name.rsplit_once('/') {
                                Some((dir, _)) => format!("{dir}/{target}"),
                                None => target,
                            }
                        } else {
                            target
                        };
                        if let Some(t) = clean_relative(&resolved) {
                            links.insert(name, t);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Source::Tar {
            path: path.to_owned(),
            entries,
            links,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            Source::Tar { path, .. } | Source::Dir { path } => path,
        }
    }

    fn missing(&self, name: &str) -> StoreError {
        StoreError::ArchiveEntryMissing {
            archive: self.path().to_owned(),
            entry: name.to_owned(),
        }
    }

    pub(crate) fn exists(&self, name: &str) -> bool {
        match self {
            Source::Tar { .. } => self.locate(name).is_some(),
            Source::Dir { path } => clean(name).is_some_and(|n| path.join(n).is_file()),
        }
    }

    fn locate(&self, name: &str) -> Option<(u64, u64)> {
        let Source::Tar { entries, links, .. } = self else {
            return None;
        };
        let mut n = clean(name)?;
        for _ in 0..8 {
            if let Some(e) = entries.get(&n) {
                return Some(*e);
            }
            n = links.get(&n)?.clone();
        }
        None
    }

    /// Opens an entry for streaming, with its size.
    pub(crate) fn open_entry(&self, name: &str) -> Result<(Box<dyn Read>, u64)> {
        match self {
            Source::Tar { path, .. } => {
                let (offset, size) = self.locate(name).ok_or_else(|| self.missing(name))?;
                let mut f = fs_err::File::open(path)
                    .map_err(|e| StoreError::io("opening archive", path, e))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(|e| StoreError::io("reading archive", path, e))?;
                Ok((
                    Box::new(io::BufReader::with_capacity(1 << 20, f).take(size)),
                    size,
                ))
            }
            Source::Dir { path } => {
                let n = clean(name).ok_or_else(|| self.missing(name))?;
                let p = path.join(n);
                let f = match fs_err::File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.missing(name)),
                    Err(e) => return Err(StoreError::io("opening", &p, e)),
                };
                let size = f
                    .metadata()
                    .map_err(|e| StoreError::io("reading", &p, e))?
                    .len();
                Ok((Box::new(io::BufReader::with_capacity(1 << 20, f)), size))
            }
        }
    }

    /// Reads a (small) entry whole.
    pub(crate) fn read(&self, name: &str) -> Result<Vec<u8>> {
        let (r, size) = self.open_entry(name)?;
        if size > MAX_JSON {
            return Err(StoreError::InvalidDocument {
                kind: "archive entry",
                what: name.to_owned(),
                reason: format!(
                    "it is {size} bytes, more than a metadata file may be ({MAX_JSON})"
                ),
            });
        }
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        r.take(MAX_JSON)
            .read_to_end(&mut out)
            .map_err(|e| StoreError::io("reading archive entry", self.path().join(name), e))?;
        Ok(out)
    }
}

/// Like `clean`, but resolves `..` inside the archive (for symlink targets).
fn clean_relative(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}
