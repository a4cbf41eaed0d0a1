//! Which samples each rank reads at each step: the lockstep plan.
//!
//! An epoch is the shuffled order of all `num_samples` samples. Step `s` of an epoch is the
//! global batch at positions `[s*G, (s+1)*G)` of that order, `G = world_size * batch_size`;
//! rank `r` takes the `r`-th run of `batch_size` samples of it. So the ranks' batches are
//! disjoint, together they are exactly the global batch a single process with batch size `G`
//! would read, and every rank has `num_samples / G` steps per epoch. The last
//! `num_samples % G` positions of each epoch's order (fewer than one global batch) are dropped;
//! being a different set of samples every epoch, nothing is dropped for good.

use super::shuffle::Permutation;

/// The sampling plan of one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub num_samples: u64,
    pub batch_size: u64,
    pub world_size: u64,
    pub rank: u64,
    pub seed: u64,
}

impl Plan {
    /// Samples that all ranks together read per step.
    pub fn global_batch(&self) -> u64 {
        self.batch_size * self.world_size
    }

    /// Steps in each epoch, the same on every rank.
    pub fn steps_per_epoch(&self) -> u64 {
        self.num_samples / self.global_batch()
    }

    /// The shuffled order of an epoch.
    pub fn order(&self, epoch: u64) -> Permutation {
        Permutation::new(self.num_samples, self.seed, epoch)
    }

    /// The sample ids of this rank's batch at `step` of the epoch whose order is `order`.
    pub fn batch(&self, order: &Permutation, step: u64) -> Vec<u64> {
        assert!(
            step < self.steps_per_epoch(),
            "step {step} is past the end of the epoch"
        );
        let first = step * self.global_batch() + self.rank * self.batch_size;
        (first..first + self.batch_size)
            .map(|i| order.get(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn plan(n: u64, batch: u64, world: u64, rank: u64) -> Plan {
        Plan {
            num_samples: n,
            batch_size: batch,
            world_size: world,
            rank,
            seed: 9,
        }
    }

    #[test]
    fn ranks_in_lockstep_form_the_single_process_global_batch() {
        let (n, batch) = (103, 4);
        for world in 1..=3 {
            let single = plan(n, batch * world, 1, 0);
            let steps = single.steps_per_epoch();
            assert_eq!(steps, n / (batch * world));
            for epoch in 0..2 {
                let order = single.order(epoch);
                let mut seen = HashSet::new();
                for step in 0..steps {
                    let mut joined = Vec::new();
                    for rank in 0..world {
                        let p = plan(n, batch, world, rank);
                        assert_eq!(p.steps_per_epoch(), steps);
                        joined.extend(p.batch(&p.order(epoch), step));
                    }
                    assert_eq!(joined, single.batch(&order, step));
                    assert!(joined.iter().all(|s| seen.insert(*s)), "a sample repeated");
                }
                assert_eq!(seen.len() as u64, steps * batch * world);
                assert_eq!(n - seen.len() as u64, n % (batch * world));
            }
        }
    }
}
