//! Waiting on words in shared memory: a backoff that spins briefly, then yields, then sleeps in
//! short steps (the machine may have fewer cores than processes), and a check that a process
//! is still alive.

use std::time::Duration;

/// Spin, then yield, then sleep up to 200 µs per step.
#[derive(Debug, Default)]
pub struct Backoff {
    step: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait a little longer than last time.
    pub fn snooze(&mut self) {
        if self.step < 8 {
            for _ in 0..(1 << self.step) {
                std::hint::spin_loop();
            }
        } else if self.step < 16 {
            std::thread::yield_now();
        } else {
            let micros = 20u64 << (self.step - 16).min(3);
            std::thread::sleep(Duration::from_micros(micros));
        }
        self.step = self.step.saturating_add(1);
    }
}

/// Whether process `pid` exists and has not exited (a zombie, dead but not yet reaped by its
/// parent, counts as dead).
pub fn process_alive(pid: u64) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    // /proc/PID/stat is "pid (comm) S ..."; the state letter follows the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with(['Z', 'X']))
        }
        Err(_) => true, // no procfs: trust kill()
    }
}

/// This process's id.
pub fn own_pid() -> u64 {
    u64::from(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(process_alive(own_pid()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = u64::from(child.id());
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn an_unreaped_dead_child_counts_as_dead() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = u64::from(child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!process_alive(pid), "a zombie child must count as dead");
        drop(child);
    }
}
