//! Shard planning and the names of a checkpoint's files.
//!
//! A *group* is a set of tensors saved together under one file prefix: `model` (Hub naming, with
//! `model.safetensors.index.json`, as transformers expects), `optimizer`, `train_state`. A group
//! is cut into shards `{group}-00001-of-0000N.safetensors` in order, each at most
//! `max_shard_bytes` unless a single tensor is larger.

use super::writer::{ShardSpec, TensorRef};

/// Cut tensors of the given sizes, in order, into shards of at most `max_shard_bytes`.
/// Returns the tensor indices of each shard; an empty input gives no shards.
pub fn plan_shards(sizes: &[usize], max_shard_bytes: usize) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        if !current.is_empty() && current_bytes + size > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Below this many bytes a group is not split further for parallelism.
pub const MIN_PARALLEL_SHARD_BYTES: usize = 64 << 20;

/// The shard size limit that lets `threads` writers work on different files.
///
/// Linux serializes writes to one file (the inode lock), so a group is cut into at least
/// `threads` shards when it is large, even if `max_shard_bytes` would allow fewer. Shards never
/// shrink below [`MIN_PARALLEL_SHARD_BYTES`] for this, and never grow past `max_shard_bytes`.
pub fn parallel_shard_limit(total_bytes: usize, threads: usize, max_shard_bytes: usize) -> usize {
    let even = total_bytes.div_ceil(threads.max(1));
    even.max(MIN_PARALLEL_SHARD_BYTES)
        .min(max_shard_bytes)
        .max(1)
}

/// Cut a group into shards named `{group}-0000i-of-0000N.safetensors`, with at most
/// `max_shard_bytes` each and at least one per writer thread when the group is large.
pub fn plan_group<'a>(
    group: &str,
    tensors: Vec<TensorRef<'a>>,
    max_shard_bytes: usize,
) -> Vec<ShardSpec<'a>> {
    let sizes: Vec<usize> = tensors.iter().map(|t| t.data.len()).collect();
    let limit = parallel_shard_limit(
        sizes.iter().sum(),
        rayon::current_num_threads(),
        max_shard_bytes,
    );
    let planned = plan_shards(&sizes, limit);
    let count = planned.len();
    let mut tensors: Vec<Option<TensorRef<'a>>> = tensors.into_iter().map(Some).collect();
    planned
        .into_iter()
        .enumerate()
        .map(|(i, indices)| ShardSpec {
            file_name: shard_file_name(group, i, count),
            group: group.to_string(),
            tensors: indices
                .into_iter()
                .map(|j| tensors[j].take().expect("planned once"))
                .collect(),
        })
        .collect()
}

/// The file name of shard `index` (0-based) of `count` in `group`, as the Hub names them.
pub fn shard_file_name(group: &str, index: usize, count: usize) -> String {
    format!("{group}-{:05}-of-{count:05}.safetensors", index + 1)
}

/// The index file of a group (`model.safetensors.index.json`).
pub fn index_file_name(group: &str) -> String {
    format!("{group}.safetensors.index.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_size_limit_and_keep_order() {
        assert_eq!(
            plan_shards(&[4, 4, 4, 4, 4], 8),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
    }

    #[test]
    fn a_tensor_larger_than_the_limit_gets_a_shard_of_its_own() {
        assert_eq!(
            plan_shards(&[1, 100, 1], 8),
            vec![vec![0], vec![1], vec![2]]
        );
    }

    #[test]
    fn nothing_to_plan_gives_no_shards() {
        assert!(plan_shards(&[], 8).is_empty());
    }

    #[test]
    fn large_groups_get_a_shard_per_thread_small_ones_stay_whole() {
        let gib = 1 << 30;
        assert_eq!(parallel_shard_limit(gib, 4, 5 * gib), gib / 4);
        assert_eq!(parallel_shard_limit(gib, 4, 100 << 20), 100 << 20);
        assert_eq!(
            parallel_shard_limit(1000, 4, 5 * gib),
            MIN_PARALLEL_SHARD_BYTES
        );
    }

    #[test]
    fn names_follow_the_hub_convention() {
        assert_eq!(
            shard_file_name("model", 0, 3),
            "model-00001-of-00003.safetensors"
        );
        assert_eq!(index_file_name("model"), "model.safetensors.index.json");
    }
}
