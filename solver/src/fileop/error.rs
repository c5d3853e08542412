//! Errors of COPY/ADD/WORKDIR.

use std::path::PathBuf;

/// Why a COPY, ADD or WORKDIR failed. The solver adds the Dockerfile line.
#[derive(Debug, thiserror::Error)]
pub enum FileOpError {
    /// A source path that does not exist in the source root.
    #[error(
        "`{path}`: not found\n\nhint: check the path and that `.dockerignore` does not exclude it"
    )]
    SourceNotFound {
        /// The source as written.
        path: String,
    },
    /// A wildcard's fixed directory part does not exist.
    #[error("`{dir}`: not found (the directory part of the wildcard `{pattern}`)")]
    WildcardDirNotFound {
        /// The pattern as written.
        pattern: String,
        /// Its directory part, cleaned.
        dir: String,
    },
    /// A malformed wildcard (`[` without `]`, bad escape).
    #[error("invalid wildcard pattern `{pattern}`")]
    BadPattern {
        /// The pattern.
        pattern: String,
    },
    /// Several sources into a destination that is not a directory.
    #[error(
        "when using {cmd} with more than one source file, the destination must be a directory and end with a /: `{dest}`"
    )]
    MultipleSourcesNeedDir {
        /// `COPY` or `ADD`.
        cmd: &'static str,
        /// The destination as written.
        dest: String,
    },
    /// A directory would be written over an existing non-directory.
    #[error("cannot copy to non-directory: `{path}`")]
    NotADirectory {
        /// The path inside the destination root.
        path: String,
    },
    /// A file would replace an existing directory.
    #[error("cannot replace directory `{path}` with a file")]
    ReplaceDirWithFile {
        /// The path inside the destination root.
        path: String,
    },
    /// A copy into a prepared upper (see [`crate::fileop::Reuse::prepared`])
    /// met an entry of the previous result whose type the sources changed:
    /// the caller copies again into a fresh upper.
    #[error("`{path}` changed type since the previous copy")]
    PreparedConflict {
        /// The path inside the destination root.
        path: String,
    },
    /// Symlinks that loop, or more than 255 of them on one path.
    #[error("too many levels of symbolic links resolving `{path}` inside the root")]
    SymlinkLoop {
        /// The path being resolved.
        path: String,
    },
    /// An `--exclude` pattern or `.dockerignore` that does not compile.
    #[error("invalid exclude pattern")]
    Exclude(#[source] kiln_parser::DockerignoreError),
    /// A `--chmod` value that is neither octal nor symbolic.
    #[error(
        "invalid chmod parameter `{value}`: it should be octal between 0 and 07777, or symbolic like `u+x,g-w`"
    )]
    BadChmod {
        /// The value as written.
        value: String,
    },
    /// A `--chown` or `USER` name with no entry in the destination root.
    #[error("unable to find {what} `{name}` in the destination's `/etc/{file}`")]
    UnknownId {
        /// `user` or `group`.
        what: &'static str,
        /// The name.
        name: String,
        /// `passwd` or `group`.
        file: &'static str,
    },
    /// A numeric `--chown` id out of range.
    #[error("invalid {what} `{value}` in `--chown`")]
    BadId {
        /// `uid` or `gid`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// A source entry of a kind that cannot be copied (socket).
    #[error("unsupported file type at `{path}`")]
    Unsupported {
        /// The source path.
        path: PathBuf,
    },
    /// A tar entry that would land outside the destination.
    #[error("archive `{archive}`: entry `{entry}` points outside the destination")]
    ArchiveEscape {
        /// The archive's source path.
        archive: String,
        /// The entry name (or link target).
        entry: String,
    },
    /// A malformed archive.
    #[error("archive `{archive}`: cannot read")]
    Archive {
        /// The archive's source path.
        archive: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A URL that could not be fetched.
    #[error("cannot download `{url}`")]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// A URL answered with a non-success status.
    #[error("cannot download `{url}`: http status {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// A `--checksum` that is not `sha256:`/`sha384:`/`sha512:` with hex.
    #[error("invalid checksum `{value}`\n\nhint: use `sha256:<64 hex digits>`")]
    BadChecksum {
        /// The value.
        value: String,
    },
    /// The downloaded content does not have the expected digest.
    #[error("checksum mismatch for `{url}`: expected `{expected}`, got `{actual}`")]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// The `--checksum` value.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
    /// `--checksum` given where it does not apply.
    #[error("`--checksum` requires ADD of a single HTTP(S) source")]
    ChecksumNotAllowed,
    /// A URL or git source in COPY.
    #[error("source `{source_word}` can't be a URL for COPY\n\nhint: use ADD")]
    UrlInCopy {
        /// The source.
        source_word: String,
    },
    /// A git source (`ADD git@…`, `--keep-git-dir`).
    #[error("git sources are not supported yet: `{url}`")]
    GitUnsupported {
        /// The source.
        url: String,
    },
    /// Any other I/O failure (the fs-err message names the path).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
