//! The seeded, epoch-dependent shuffle: a random-access permutation of `0..n`.
//!
//! Instead of materialising a shuffled index array (8 bytes per sample, rebuilt every epoch),
//! the permutation is a keyed Feistel network over the smallest power-of-four domain that holds
//! `n`, with cycle-walking to stay inside `0..n` (Black & Rogaway, "Ciphers with arbitrary finite
//! domains", 2002). Any position can be looked up in O(1) memory and a few hash evaluations, so
//! every prefetch thread and every rank computes exactly the slice it needs. The keys depend on
//! `(seed, epoch)`, so each epoch visits the samples in a new order.

/// Feistel rounds; four already make a pseudorandom permutation, six add margin.
const ROUNDS: usize = 6;

/// SplitMix64's finaliser: a fast, well-mixing 64-bit hash.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A permutation of `0..n` keyed by `(seed, epoch)`.
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; ROUNDS],
}

impl Permutation {
    pub fn new(n: u64, seed: u64, epoch: u64) -> Self {
        // The domain is 4^half_bits >= n, with at least one bit per half.
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let base = mix64(mix64(seed) ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let keys = std::array::from_fn(|r| mix64(base.wrapping_add(r as u64)));
        Self { n, half_bits, keys }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// One pass of the Feistel network: a bijection of `0..4^half_bits`.
    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.keys {
            let f = mix64(right ^ key) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }

    /// The element at position `i` of the shuffled order (`i < n`).
    pub fn get(&self, i: u64) -> u64 {
        assert!(
            i < self.n,
            "position {i} is outside a permutation of {}",
            self.n
        );
        // Cycle-walking: the cycle of the domain permutation through i returns to 0..n within
        // fewer than 4 steps on average, because the domain is less than 4n.
        let mut x = self.encrypt(i);
        while x >= self.n {
            x = self.encrypt(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
        let p = Permutation::new(n, seed, epoch);
        (0..n).map(|i| p.get(i)).collect()
    }

    #[test]
    fn is_a_permutation_for_every_small_size() {
        for n in 1..200 {
            let mut seen = order(n, 7, 3);
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let mut big = order(100_003, 1, 0);
        big.sort_unstable();
        assert!(big.iter().enumerate().all(|(i, &x)| i as u64 == x));
    }

    #[test]
    fn seed_and_epoch_change_the_order_and_repeat_it_exactly() {
        assert_eq!(order(1000, 5, 2), order(1000, 5, 2));
        assert_ne!(order(1000, 5, 2), order(1000, 6, 2));
        assert_ne!(order(1000, 5, 2), order(1000, 5, 3));
    }

    #[test]
    fn the_order_looks_shuffled() {
        // Few fixed points and no long ascending runs, as for a uniformly random permutation
        // (expected fixed points: 1; expected ascending adjacent pairs: n/2).
        let o = order(10_000, 42, 0);
        let fixed = o
            .iter()
            .enumerate()
            .filter(|&(i, &x)| i as u64 == x)
            .count();
        assert!(fixed < 10, "{fixed} fixed points");
        let ascending = o.windows(2).filter(|w| w[0] < w[1]).count();
        assert!(
            (4500..5500).contains(&ascending),
            "{ascending} ascending pairs"
        );
    }
}
