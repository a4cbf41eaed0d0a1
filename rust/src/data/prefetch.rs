//! Background prefetch: worker threads produce items `0, 1, 2, ...` ahead of the consumer and
//! hand them over in order.
//!
//! Workers claim the next index under a lock, produce it unlocked, and file it in a reorder
//! buffer; they stay at most `depth` items ahead of the consumer. The threads are plain Rust
//! threads that never touch Python, so they run while the interpreter holds the GIL. Seeking
//! (to resume from a saved position) bumps a generation counter, so work started before the seek
//! is discarded when it lands. A panic in a worker is caught and handed to the consumer as an
//! error at the index it happened at.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a worker produced: the item, or the message of the panic that stopped it.
pub type Produced<T> = Result<T, String>;

struct Queue<T> {
    next_to_produce: u64,
    next_to_consume: u64,
    generation: u64,
    ready: BTreeMap<u64, Produced<T>>,
    shutdown: bool,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    changed: Condvar,
    depth: u64,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        // Workers never panic while holding the lock (production runs unlocked and is caught),
        // so a poisoned lock still holds a consistent queue.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An ordered stream of items produced by background threads.
pub struct Prefetcher<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Start `threads` workers producing `produce(i)` for `i = start, start + 1, ...`, at most
    /// `depth` items ahead of the consumer.
    pub fn new<F>(start: u64, depth: usize, threads: usize, produce: F) -> Self
    where
        F: Fn(u64) -> T + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                next_to_produce: start,
                next_to_consume: start,
                generation: 0,
                ready: BTreeMap::new(),
                shutdown: false,
            }),
            changed: Condvar::new(),
            depth: depth.max(1) as u64,
        });
        let produce = Arc::new(produce);
        let workers = (0..threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                let produce = Arc::clone(&produce);
                std::thread::Builder::new()
                    .name(format!("k2-prefetch-{i}"))
                    .spawn(move || work(&shared, &*produce))
                    .expect("cannot spawn a prefetch thread")
            })
            .collect();
        Self { shared, workers }
    }

    /// The next item, waiting at most `timeout` for it (`None` if it is not ready by then).
    pub fn next_within(&self, timeout: Duration) -> Option<Produced<T>> {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.lock();
        loop {
            let want = q.next_to_consume;
            if let Some(item) = q.ready.remove(&want) {
                q.next_to_consume += 1;
                self.shared.changed.notify_all();
                return Some(item);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            q = self
                .shared
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The index of the item the next call to [`Prefetcher::next_within`] returns.
    pub fn position(&self) -> u64 {
        self.shared.lock().next_to_consume
    }

    /// Items produced and waiting for the consumer.
    pub fn buffered(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// Continue from item `position`, dropping everything produced or in flight.
    pub fn seek(&self, position: u64) {
        let mut q = self.shared.lock();
        q.generation += 1;
        q.ready.clear();
        q.next_to_produce = position;
        q.next_to_consume = position;
        self.shared.changed.notify_all();
    }
}

fn work<T>(shared: &Shared<T>, produce: &(dyn Fn(u64) -> T + Sync)) {
    let mut q = shared.lock();
    loop {
        if q.shutdown {
            return;
        }
        if q.next_to_produce >= q.next_to_consume + shared.depth {
            q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let (index, generation) = (q.next_to_produce, q.generation);
        q.next_to_produce += 1;
        drop(q);
        let item = catch_unwind(AssertUnwindSafe(|| produce(index))).map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_string())
        });
        q = shared.lock();
        if q.generation == generation {
            q.ready.insert(index, item);
            shared.changed.notify_all();
        }
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn items_arrive_in_order_from_many_threads() {
        let p = Prefetcher::new(5, 4, 3, |i| {
            // Uneven work, so threads finish out of order.
            std::thread::sleep(Duration::from_micros((i % 3) * 300));
            i * 10
        });
        let got: Vec<u64> = (0..20)
            .map(|_| p.next_within(WAIT).unwrap().unwrap())
            .collect();
        assert_eq!(got, (5..25).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(p.position(), 25);
    }

    #[test]
    fn workers_stay_within_the_depth_and_fill_it_without_the_consumer() {
        let produced = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&produced);
        let p = Prefetcher::new(0, 3, 2, move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            i
        });
        let deadline = Instant::now() + WAIT;
        while p.buffered() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(p.buffered(), 3);
        assert_eq!(produced.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn seek_discards_read_ahead_items() {
        let p = Prefetcher::new(0, 4, 2, |i| i);
        assert_eq!(p.next_within(WAIT).unwrap().unwrap(), 0);
        p.seek(100);
        assert_eq!(p.next_within(WAIT).unwrap().unwrap(), 100);
        p.seek(1);
        assert_eq!(p.next_within(WAIT).unwrap().unwrap(), 1);
        assert_eq!(p.next_within(WAIT).unwrap().unwrap(), 2);
    }

    #[test]
    fn a_panic_becomes_an_error_at_its_index() {
        let p = Prefetcher::new(0, 2, 1, |i| {
            if i == 1 {
                panic!("boom at {i}");
            }
            i
        });
        assert_eq!(p.next_within(WAIT).unwrap(), Ok(0));
        assert_eq!(p.next_within(WAIT).unwrap(), Err("boom at 1".to_string()));
        assert_eq!(p.next_within(WAIT).unwrap(), Ok(2));
    }

    #[test]
    fn next_within_times_out_when_nothing_is_ready() {
        let p = Prefetcher::new(0, 1, 1, |i| {
            std::thread::sleep(Duration::from_millis(300));
            i
        });
        assert!(p.next_within(Duration::from_millis(1)).is_none());
    }
}
