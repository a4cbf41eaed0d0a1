//! The errors of the token pipeline. Every variant names the file it is about.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong with a token shard or a loader.
#[derive(Debug)]
pub enum DataError {
    /// The file could not be opened, read, mapped or written.
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// The file is not a valid token shard (wrong magic, truncated, inconsistent header, a
    /// document index that does not add up, a checksum mismatch, a newer format version).
    Corrupt { path: PathBuf, reason: String },
    /// A token id or a request that the shard or loader cannot hold (out of vocabulary, a
    /// dataset too small for one global batch, a state from a different dataset).
    Invalid { path: PathBuf, reason: String },
}

impl DataError {
    pub fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }

    pub fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                path,
                action,
                source,
            } => {
                write!(f, "cannot {action} {}: {source}", path.display())
            }
            Self::Corrupt { path, reason } => {
                write!(
                    f,
                    "{} is not a valid k2 token shard: {reason}",
                    path.display()
                )
            }
            Self::Invalid { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
