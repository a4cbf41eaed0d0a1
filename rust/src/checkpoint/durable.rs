//! Small durable file-system steps, each recorded in a [`Trace`].
//!
//! `durable = false` skips every fsync (used to measure serialization into the page cache);
//! the order of writes and renames is the same either way.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::error::{CkptError, Result};
use super::trace::{Op, Trace};

/// fsync a file that is open for writing.
pub fn fsync_file(file: &File, path: &Path, trace: &Trace) -> Result<()> {
    file.sync_all().map_err(CkptError::io("fsync", path))?;
    trace.record(Op::Fsync, path);
    Ok(())
}

/// fsync a directory, which makes the creation, removal and renaming of its entries durable.
pub fn fsync_dir(dir: &Path, trace: &Trace) -> Result<()> {
    let handle = File::open(dir).map_err(CkptError::io("open directory", dir))?;
    handle
        .sync_all()
        .map_err(CkptError::io("fsync directory", dir))?;
    trace.record(Op::DirFsync, dir);
    Ok(())
}

/// Create `path` with `bytes` as its content; fsync it when `durable`.
pub fn write_file(path: &Path, bytes: &[u8], durable: bool, trace: &Trace) -> Result<()> {
    let mut file = File::create(path).map_err(CkptError::io("create", path))?;
    file.write_all(bytes)
        .map_err(CkptError::io("write", path))?;
    trace.record(Op::Write, path);
    if durable {
        fsync_file(&file, path, trace)?;
    }
    Ok(())
}

/// Rename `from` to `to` (atomic within one file system; replaces a file at `to`).
pub fn rename(from: &Path, to: &Path, trace: &Trace) -> Result<()> {
    fs::rename(from, to).map_err(CkptError::io("rename", from))?;
    trace.record_rename(from, to);
    Ok(())
}

/// Remove a directory tree.
pub fn remove_dir(dir: &Path, trace: &Trace) -> Result<()> {
    fs::remove_dir_all(dir).map_err(CkptError::io("remove", dir))?;
    trace.record(Op::Remove, dir);
    Ok(())
}
