//! Publishing checkpoints in a root: the `latest` pointer, listing, and keep-last-K pruning.
//!
//! A checkpoint root holds checkpoint directories (complete ones have a `manifest.json`), a
//! `latest` file naming the newest complete one, and transiently `.k2-tmp-NAME` (a save in
//! progress) and `.k2-trash-NAME` (a checkpoint being removed) directories.

use std::fs;
use std::path::Path;

use super::durable;
use super::error::{CkptError, Result};
use super::manifest::MANIFEST_FILE;
use super::trace::{fault_point, Trace};

/// The file in a checkpoint root that names the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
/// Prefix of the directory a save writes into before it is renamed into place.
pub const TMP_PREFIX: &str = ".k2-tmp-";
/// Prefix a pruned checkpoint is renamed to before it is removed.
pub const TRASH_PREFIX: &str = ".k2-trash-";

/// Point `root/latest` at checkpoint `name` atomically (write `latest.tmp`, fsync, rename).
pub fn move_latest(root: &Path, name: &str, durable: bool, trace: &Trace) -> Result<()> {
    let tmp = root.join(format!("{LATEST_FILE}.tmp"));
    durable::write_file(&tmp, format!("{name}\n").as_bytes(), durable, trace)?;
    fault_point("latest_tmp_written");
    durable::rename(&tmp, &root.join(LATEST_FILE), trace)?;
    if durable {
        durable::fsync_dir(root, trace)?;
    }
    Ok(())
}

/// The checkpoint `root/latest` names, if any.
pub fn read_latest(root: &Path) -> Result<Option<String>> {
    let path = root.join(LATEST_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let name = text.trim();
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(CkptError::format(
                    &path,
                    format!("names {name:?}, not a checkpoint"),
                ));
            }
            Ok(Some(name.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CkptError::io("read", &path)(e)),
    }
}

/// The complete checkpoints in `root` (directories holding a manifest), sorted by name, which
/// for k2's `step-NNNNNNNN` names is the order they were saved in.
pub fn list_checkpoints(root: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(root).map_err(CkptError::io("list", root))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(CkptError::io("list", root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().join(MANIFEST_FILE).is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Keep the last `keep_last` checkpoints of `root` (and always the one `latest` names); remove
/// the rest, and any temporary or trash directory a crashed save left behind.
pub fn prune(root: &Path, keep_last: usize, durable: bool, trace: &Trace) -> Result<()> {
    let latest = read_latest(root)?;
    let names = list_checkpoints(root)?;
    let cut = names.len().saturating_sub(keep_last.max(1));
    for name in &names[..cut] {
        if Some(name) == latest.as_ref() {
            continue;
        }
        let trash = root.join(format!("{TRASH_PREFIX}{name}"));
        durable::rename(&root.join(name), &trash, trace)?;
        if durable {
            durable::fsync_dir(root, trace)?;
        }
        fault_point("mid_prune");
        durable::remove_dir(&trash, trace)?;
    }
    for entry in fs::read_dir(root).map_err(CkptError::io("list", root))? {
        let entry = entry.map_err(CkptError::io("list", root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
            durable::remove_dir(&entry.path(), trace)?;
        }
    }
    Ok(())
}
