//! What a save did to the file system, in order, and where it may be told to die.
//!
//! A killed process leaves the page cache intact, so a crash test alone cannot show that a save
//! is durable. The [`Trace`] records every write, fsync, rename, directory fsync and removal in
//! the order they happened; tests check that each file was written and fsynced before the
//! rename that publishes it, and that the directory was fsynced after.
//!
//! Fault injection: with `K2_CKPT_FAULT=<phase>` in the environment, the process kills itself
//! with SIGKILL when a save reaches that phase. [`FAULT_PHASES`] lists them in the order a save
//! passes through them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The environment variable that names the phase to die at.
pub const FAULT_ENV: &str = "K2_CKPT_FAULT";

/// The fault-injection points of a save, in the order it reaches them.
pub const FAULT_PHASES: &[&str] = &[
    "tmp_created",        // the temporary directory exists, nothing written
    "mid_write",          // about half of the shard bytes written
    "shards_written",     // every shard written, none fsynced
    "shards_synced",      // every shard fsynced
    "manifest_written",   // manifest written and fsynced, directory not yet fsynced
    "before_rename",      // temporary directory fsynced, not yet renamed into place
    "after_rename",       // renamed into place, parent directory not yet fsynced
    "latest_tmp_written", // `latest.tmp` written and fsynced, not yet renamed over `latest`
    "after_latest",       // `latest` moved, old checkpoints not yet pruned
    "mid_prune",          // an old checkpoint moved to the trash, not yet removed
];

/// Die with SIGKILL if `K2_CKPT_FAULT` names `phase`.
pub fn fault_point(phase: &str) {
    debug_assert!(FAULT_PHASES.contains(&phase), "unknown fault phase {phase}");
    if std::env::var_os(FAULT_ENV).is_some_and(|v| v == phase) {
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}

/// A file-system operation a save performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Every byte of a file has been handed to the kernel.
    Write,
    /// A file was fsynced.
    Fsync,
    /// A file or directory was renamed (`path` -> `to`).
    Rename,
    /// A directory was fsynced (makes creations and renames in it durable).
    DirFsync,
    /// A directory tree was removed.
    Remove,
}

impl Op {
    /// The lower-case name used in reports and in Python.
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Fsync => "fsync",
            Op::Rename => "rename",
            Op::DirFsync => "dir_fsync",
            Op::Remove => "remove",
        }
    }
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub op: Op,
    pub path: PathBuf,
    /// The destination of a rename.
    pub to: Option<PathBuf>,
}

/// The ordered log of a save's operations (safe to append to from worker threads).
#[derive(Debug, Default)]
pub struct Trace(Mutex<Vec<Event>>);

impl Trace {
    /// Record `op` on `path`.
    pub fn record(&self, op: Op, path: &Path) {
        self.push(Event {
            op,
            path: path.to_path_buf(),
            to: None,
        });
    }

    /// Record a rename of `from` to `to`.
    pub fn record_rename(&self, from: &Path, to: &Path) {
        self.push(Event {
            op: Op::Rename,
            path: from.to_path_buf(),
            to: Some(to.to_path_buf()),
        });
    }

    fn push(&self, event: Event) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }

    /// Take the events recorded so far, leaving the log empty.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_back_in_the_order_recorded() {
        let trace = Trace::default();
        trace.record(Op::Write, Path::new("a"));
        trace.record(Op::Fsync, Path::new("a"));
        trace.record_rename(Path::new("t"), Path::new("d"));
        let ops: Vec<_> = trace.take().iter().map(|e| e.op).collect();
        assert_eq!(ops, vec![Op::Write, Op::Fsync, Op::Rename]);
        assert!(trace.take().is_empty());
    }

    #[test]
    fn an_unset_fault_variable_does_not_fire() {
        // The test process never sets K2_CKPT_FAULT; reaching here means the point returned.
        if std::env::var_os(FAULT_ENV).is_none() {
            fault_point("mid_write");
        }
    }
}
