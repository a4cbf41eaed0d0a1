//! Recycled batch buffers.
//!
//! A batch of 32 x 1024 tokens is three 256 KiB arrays. Allocating them fresh for every batch
//! sends glibc's allocator to the kernel: buffers that size come from `mmap` (or from arena tops
//! it trims back), so each batch pays page faults for every page it writes, and the unmaps from
//! several threads pay TLB shootdowns. On a two-core machine that halved the loader's
//! throughput. The pool keeps a few buffers whose pages are already resident and hands them out
//! again, once their previous owner (a Python array, in the binding) has let go of them — so a
//! batch is still never shared with a live one.

use std::sync::Mutex;

/// A bounded stack of spare `Vec<i64>` buffers.
#[derive(Debug)]
pub struct BufferPool {
    spare: Mutex<Vec<Vec<i64>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` spare buffers.
    pub fn new(keep: usize) -> Self {
        Self {
            spare: Mutex::new(Vec::new()),
            keep,
        }
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Vec<Vec<i64>>> {
        // The lock guards only pushes and pops, which cannot panic halfway.
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with room for at least `len` values: a recycled one if one fits.
    pub fn take(&self, len: usize) -> Vec<i64> {
        let mut spare = self.spare();
        match spare.iter().rposition(|v| v.capacity() >= len) {
            Some(i) => spare.swap_remove(i),
            None => Vec::with_capacity(len),
        }
    }

    /// Hand a buffer back for reuse (it is freed instead if the pool is full).
    pub fn give(&self, mut buffer: Vec<i64>) {
        buffer.clear();
        let mut spare = self.spare();
        if spare.len() < self.keep {
            spare.push(buffer);
        }
    }

    /// Spare buffers held now.
    pub fn len(&self) -> usize {
        self.spare().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_empty_and_the_pool_stays_bounded() {
        let pool = BufferPool::new(2);
        let mut a = pool.take(100);
        a.extend(0..100);
        let address = a.as_ptr();
        pool.give(a);
        let again = pool.take(50);
        assert_eq!((again.as_ptr(), again.len()), (address, 0));
        assert!(
            pool.take(1000).capacity() >= 1000,
            "too small a spare is not handed out"
        );
        for _ in 0..5 {
            pool.give(Vec::with_capacity(10));
        }
        assert_eq!(pool.len(), 2);
    }
}
