//! The one error type of the checkpoint module. Every variant names the file (and, where there is
//! one, the tensor) it is about, so the message alone tells the user what to look at.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::interrupt::Cancelled;

/// Why a checkpoint could not be written, opened or read.
#[derive(Debug)]
pub enum CkptError {
    /// An operating-system call on `path` failed.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file is not what it should be: truncated, a bad safetensors header, a manifest that
    /// disagrees with the shard it describes.
    Format { path: PathBuf, msg: String },
    /// A checksum did not match: bytes `start..end` of `path` (chunk `chunk` of `tensor`).
    Corrupt {
        path: PathBuf,
        tensor: String,
        chunk: usize,
        start: u64,
        end: u64,
    },
    /// A tensor or checkpoint that was asked for does not exist.
    NotFound(String),
    /// The caller asked for something impossible (a row range out of bounds, a duplicate name).
    Invalid(String),
    /// The work was cancelled (Ctrl-C).
    Cancelled,
}

/// Result alias of the checkpoint module.
pub type Result<T> = std::result::Result<T, CkptError>;

impl CkptError {
    /// Wrap an I/O error with what was being done to which path.
    pub fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> CkptError + 'a {
        move |source| CkptError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A format error about `path`.
    pub fn format(path: &Path, msg: impl Into<String>) -> CkptError {
        CkptError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for CkptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CkptError::Io {
                action,
                path,
                source,
            } => {
                write!(f, "cannot {action} {}: {source}", path.display())
            }
            CkptError::Format { path, msg } => write!(f, "{}: {msg}", path.display()),
            CkptError::Corrupt {
                path,
                tensor,
                chunk,
                start,
                end,
            } => write!(
                f,
                "checksum mismatch in {} (tensor {tensor:?}, chunk {chunk}, bytes {start}..{end}): \
                 the file is corrupt",
                path.display()
            ),
            CkptError::NotFound(what) => write!(f, "{what}"),
            CkptError::Invalid(what) => write!(f, "{what}"),
            CkptError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for CkptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CkptError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Cancelled> for CkptError {
    fn from(_: Cancelled) -> Self {
        CkptError::Cancelled
    }
}
