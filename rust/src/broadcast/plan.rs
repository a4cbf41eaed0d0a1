//! The bucket plan: where every tensor's bytes travel.
//!
//! Tensors are laid out, in the order given, in one flat *arena*, each starting at a 256-byte
//! aligned offset. The arena is cut into fixed-size buckets (bucket `b` is the window
//! `[b * bucket_bytes, (b + 1) * bucket_bytes)`). A tensor that fits in a bucket never straddles
//! two: if it would, it moves to the start of the next bucket. A tensor larger than a bucket
//! starts at the next aligned offset and runs on through as many buckets as it needs. Either
//! way every tensor is contiguous in the arena, so a subscriber that takes everything can land a
//! bucket with one copy.
//!
//! A subscriber may want only some rows (dim 0) of a tensor: a tensor-parallel row range, or a
//! subset of experts of a stacked `[E, ...]` tensor. [`ReceivePlan`] turns such a selection into,
//! per bucket, the byte pieces to copy into the subscriber's *landing* buffer, where each
//! selected tensor slice lies contiguous, ready to be copied into the model.

use std::collections::HashSet;
use std::ops::Range;

use super::error::{BroadcastError, Result};

/// Every tensor starts at a multiple of this many bytes in the arena and in landing buffers.
pub const ALIGN: u64 = 256;

/// Name, dtype and shape of one published tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// The dtype's name as torch spells it without the prefix (`float32`, `bfloat16`, ...).
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Bytes per element.
    pub itemsize: u64,
}

impl TensorSpec {
    /// Size of the tensor in bytes.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.itemsize
    }

    /// Number of rows (dim 0); a 0-d tensor has one row.
    pub fn rows(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Bytes in one row (dim 0 slice).
    pub fn row_bytes(&self) -> u64 {
        self.shape.iter().skip(1).product::<u64>() * self.itemsize
    }
}

/// One piece of a tensor inside one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the tensor in the plan.
    pub tensor: usize,
    /// Byte offset of the piece within the tensor.
    pub tensor_offset: u64,
    /// Byte offset of the piece within the bucket.
    pub bucket_offset: u64,
    pub len: u64,
}

/// Tensors packed into fixed-size buckets; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    bucket_bytes: u64,
    tensors: Vec<TensorSpec>,
    /// Arena offset of each tensor.
    offsets: Vec<u64>,
    arena_bytes: u64,
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

impl BucketPlan {
    /// Pack `tensors` into buckets of `bucket_bytes` (a positive multiple of [`ALIGN`]).
    pub fn new(tensors: Vec<TensorSpec>, bucket_bytes: u64) -> Result<Self> {
        if bucket_bytes == 0 || bucket_bytes % ALIGN != 0 {
            return Err(BroadcastError::plan(format!(
                "bucket size {bucket_bytes} must be a positive multiple of {ALIGN} bytes"
            )));
        }
        let mut seen = HashSet::new();
        for t in &tensors {
            if t.name.is_empty() || t.name.contains(['\t', '\n']) || t.dtype.contains(['\t', '\n'])
            {
                return Err(BroadcastError::plan(format!(
                    "tensor name {:?} / dtype {:?} must be non-empty and free of tabs and newlines",
                    t.name, t.dtype
                )));
            }
            if t.itemsize == 0 || ALIGN % t.itemsize != 0 {
                return Err(BroadcastError::plan(format!(
                    "tensor {}: element size {} does not divide {ALIGN}",
                    t.name, t.itemsize
                )));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(BroadcastError::plan(format!(
                    "tensor {} is listed twice",
                    t.name
                )));
            }
        }
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut cursor = 0u64;
        for t in &tensors {
            cursor = align_up(cursor);
            let n = t.nbytes();
            let room = bucket_bytes - cursor % bucket_bytes;
            if n <= bucket_bytes && n > room {
                cursor += room; // start of the next bucket
            }
            offsets.push(cursor);
            cursor += n;
        }
        Ok(Self {
            bucket_bytes,
            tensors,
            offsets,
            arena_bytes: cursor,
        })
    }

    pub fn bucket_bytes(&self) -> u64 {
        self.bucket_bytes
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Arena offset of tensor `i`.
    pub fn offset(&self, i: usize) -> u64 {
        self.offsets[i]
    }

    /// Total bytes of the arena (the end of the last tensor).
    pub fn arena_bytes(&self) -> u64 {
        self.arena_bytes
    }

    pub fn num_buckets(&self) -> usize {
        self.arena_bytes.div_ceil(self.bucket_bytes) as usize
    }

    /// The arena window of bucket `b` (the last bucket may be shorter than `bucket_bytes`).
    pub fn bucket_range(&self, b: usize) -> Range<u64> {
        let start = b as u64 * self.bucket_bytes;
        start..(start + self.bucket_bytes).min(self.arena_bytes)
    }

    /// Index of a tensor by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// The tensor pieces held by bucket `b`, in arena order.
    pub fn chunks(&self, b: usize) -> Vec<Chunk> {
        let window = self.bucket_range(b);
        let mut out = Vec::new();
        for (i, t) in self.tensors.iter().enumerate() {
            let (start, end) = (self.offsets[i], self.offsets[i] + t.nbytes());
            let (lo, hi) = (start.max(window.start), end.min(window.end));
            if lo < hi {
                out.push(Chunk {
                    tensor: i,
                    tensor_offset: lo - start,
                    bucket_offset: lo - window.start,
                    len: hi - lo,
                });
            }
        }
        out
    }

    /// The plan's tensor list as text (one `name\tdtype\tdim,dim,...\titemsize` line each), for
    /// the shared-memory segment; [`BucketPlan::decode`] reads it back.
    pub fn encode(&self) -> String {
        let mut s = format!("bucket_bytes\t{}\n", self.bucket_bytes);
        for t in &self.tensors {
            let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
            s.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                t.name,
                t.dtype,
                shape.join(","),
                t.itemsize
            ));
        }
        s
    }

    /// Inverse of [`BucketPlan::encode`].
    pub fn decode(text: &str) -> Result<Self> {
        let bad = |line: &str| BroadcastError::layout(format!("malformed plan line {line:?}"));
        let mut lines = text.lines();
        let first = lines.next().ok_or_else(|| bad(""))?;
        let bucket_bytes = first
            .strip_prefix("bucket_bytes\t")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(first))?;
        let mut tensors = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 4 {
                return Err(bad(line));
            }
            let shape = if f[2].is_empty() {
                Vec::new()
            } else {
                f[2].split(',')
                    .map(|d| d.parse().map_err(|_| bad(line)))
                    .collect::<Result<_>>()?
            };
            tensors.push(TensorSpec {
                name: f[0].to_string(),
                dtype: f[1].to_string(),
                shape,
                itemsize: f[3].parse().map_err(|_| bad(line))?,
            });
        }
        Self::new(tensors, bucket_bytes)
    }
}

/// Which rows of which tensor a subscriber wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// Index of the tensor in the plan.
    pub tensor: usize,
    /// Row ranges (dim 0) in the order they are to be laid out; `None` means the whole tensor.
    pub rows: Option<Vec<Range<u64>>>,
}

/// Where one wanted tensor (slice) lies in the landing buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub tensor: usize,
    pub landing_offset: u64,
    pub len: u64,
}

/// A copy from a bucket into the landing buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub bucket_offset: u64,
    pub landing_offset: u64,
    pub len: u64,
}

/// One subscriber's copies: its landing layout and, per bucket, the pieces to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivePlan {
    pub landing_bytes: u64,
    pub targets: Vec<Target>,
    /// `pieces[b]`: copies out of bucket `b`, sorted by bucket offset.
    pub pieces: Vec<Vec<Piece>>,
}

impl ReceivePlan {
    /// The copies that deliver `wants` out of `plan`'s buckets.
    ///
    /// When the subscriber wants every tensor whole, in plan order, the landing buffer mirrors
    /// the arena and each bucket lands with a single copy (padding included).
    pub fn new(plan: &BucketPlan, wants: &[Want]) -> Result<Self> {
        for w in wants {
            let t = plan.tensors.get(w.tensor).ok_or_else(|| {
                BroadcastError::plan(format!("tensor index {} is not in the plan", w.tensor))
            })?;
            for r in w.rows.iter().flatten() {
                if r.start >= r.end || r.end > t.rows() {
                    return Err(BroadcastError::plan(format!(
                        "tensor {}: row range {}..{} is empty or outside its {} rows",
                        t.name,
                        r.start,
                        r.end,
                        t.rows()
                    )));
                }
            }
        }
        let mirror = wants.len() == plan.tensors.len()
            && wants
                .iter()
                .enumerate()
                .all(|(i, w)| w.tensor == i && w.rows.is_none());
        let mut targets = Vec::with_capacity(wants.len());
        let mut pieces = vec![Vec::new(); plan.num_buckets()];
        let mut cursor = 0u64;
        for w in wants {
            let t = &plan.tensors[w.tensor];
            #[allow(clippy::single_range_in_vec_init)] // one range: the whole tensor
            let byte_ranges: Vec<Range<u64>> = match &w.rows {
                None => vec![0..t.nbytes()],
                Some(rows) => rows
                    .iter()
                    .map(|r| r.start * t.row_bytes()..r.end * t.row_bytes())
                    .collect(),
            };
            let landing_offset = if mirror {
                plan.offsets[w.tensor]
            } else {
                align_up(cursor)
            };
            let mut dst = landing_offset;
            for r in byte_ranges {
                let (mut src, end) = (
                    plan.offsets[w.tensor] + r.start,
                    plan.offsets[w.tensor] + r.end,
                );
                while src < end {
                    let b = (src / plan.bucket_bytes) as usize;
                    let window = plan.bucket_range(b);
                    let len = end.min(window.end) - src;
                    pieces[b].push(Piece {
                        bucket_offset: src - window.start,
                        landing_offset: dst,
                        len,
                    });
                    src += len;
                    dst += len;
                }
            }
            targets.push(Target {
                tensor: w.tensor,
                landing_offset,
                len: dst - landing_offset,
            });
            cursor = dst;
        }
        for list in &mut pieces {
            list.sort_by_key(|p| p.bucket_offset);
            *list = merge(std::mem::take(list), mirror);
        }
        let landing_bytes = if mirror { plan.arena_bytes } else { cursor };
        Ok(Self {
            landing_bytes,
            targets,
            pieces,
        })
    }
}

/// Join pieces that continue each other in both bucket and landing buffer. In a mirrored
/// landing buffer the gaps between pieces are padding nobody owns, so pieces separated only by
/// such a gap are joined too.
fn merge(pieces: Vec<Piece>, mirror: bool) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        if let Some(last) = out.last_mut() {
            let src_end = last.bucket_offset + last.len;
            let dst_end = last.landing_offset + last.len;
            let joins = if mirror {
                p.bucket_offset >= src_end
                    && p.bucket_offset - src_end == p.landing_offset.wrapping_sub(dst_end)
            } else {
                p.bucket_offset == src_end && p.landing_offset == dst_end
            };
            if joins {
                last.len = p.bucket_offset + p.len - last.bucket_offset;
                continue;
            }
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[u64], itemsize: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: "float32".into(),
            shape: shape.to_vec(),
            itemsize,
        }
    }

    #[test]
    fn tensors_are_aligned_and_small_ones_never_straddle() {
        // bucket 1024: a (40 B) at 0; b (500 B) at 256; c (500 B) would straddle at 768, so it
        // moves to 1024; d (3000 B, bigger than a bucket) at 1536, running through buckets 1..=4.
        let plan = BucketPlan::new(
            vec![
                spec("a", &[10], 4),
                spec("b", &[125], 4),
                spec("c", &[125], 4),
                spec("d", &[750], 4),
            ],
            1024,
        )
        .unwrap();
        assert_eq!(
            (0..4).map(|i| plan.offset(i)).collect::<Vec<_>>(),
            vec![0, 256, 1024, 1536]
        );
        assert_eq!(plan.arena_bytes(), 4536);
        assert_eq!(plan.num_buckets(), 5);
        assert_eq!(plan.bucket_range(4), 4096..4536);
        assert_eq!(
            plan.chunks(1),
            vec![
                Chunk {
                    tensor: 2,
                    tensor_offset: 0,
                    bucket_offset: 0,
                    len: 500
                },
                Chunk {
                    tensor: 3,
                    tensor_offset: 0,
                    bucket_offset: 512,
                    len: 512
                },
            ]
        );
        assert_eq!(
            plan.chunks(4),
            vec![Chunk {
                tensor: 3,
                tensor_offset: 2560,
                bucket_offset: 0,
                len: 440
            }]
        );
    }

    #[test]
    fn every_byte_of_every_tensor_is_in_exactly_one_chunk() {
        let tensors: Vec<_> = (0..20)
            .map(|i| spec(&format!("t{i}"), &[i * 37 + 1, 3], 2))
            .collect();
        let plan = BucketPlan::new(tensors.clone(), 512).unwrap();
        let mut covered: Vec<u64> = vec![0; tensors.len()];
        for b in 0..plan.num_buckets() {
            for c in plan.chunks(b) {
                assert_eq!(
                    c.tensor_offset, covered[c.tensor],
                    "chunks of a tensor come in order"
                );
                assert!(c.bucket_offset + c.len <= 512);
                covered[c.tensor] += c.len;
            }
        }
        let sizes: Vec<u64> = tensors.iter().map(TensorSpec::nbytes).collect();
        assert_eq!(covered, sizes);
    }

    #[test]
    fn bad_plans_are_refused() {
        assert!(BucketPlan::new(vec![spec("a", &[1], 4)], 1000).is_err());
        assert!(BucketPlan::new(vec![spec("a", &[1], 4), spec("a", &[2], 4)], 1024).is_err());
        assert!(BucketPlan::new(vec![spec("a\tb", &[1], 4)], 1024).is_err());
    }

    #[test]
    fn encode_then_decode_is_the_same_plan() {
        let plan = BucketPlan::new(
            vec![spec("x.weight", &[3, 5], 4), spec("scalar", &[], 8)],
            2048,
        )
        .unwrap();
        assert_eq!(BucketPlan::decode(&plan.encode()).unwrap(), plan);
    }

    /// Apply a receive plan to a fake arena and return the landing buffer.
    fn land(plan: &BucketPlan, recv: &ReceivePlan, arena: &[u8]) -> Vec<u8> {
        let mut landing = vec![0u8; recv.landing_bytes as usize];
        for (b, list) in recv.pieces.iter().enumerate() {
            let base = plan.bucket_range(b).start;
            for p in list {
                let src = (base + p.bucket_offset) as usize;
                let dst = p.landing_offset as usize;
                landing[dst..dst + p.len as usize]
                    .copy_from_slice(&arena[src..src + p.len as usize]);
            }
        }
        landing
    }

    #[test]
    fn a_full_subscriber_lands_each_bucket_with_one_copy() {
        let tensors: Vec<_> = (0..9)
            .map(|i| spec(&format!("t{i}"), &[i * 50 + 3], 4))
            .collect();
        let plan = BucketPlan::new(tensors, 1024).unwrap();
        let wants: Vec<_> = (0..9)
            .map(|i| Want {
                tensor: i,
                rows: None,
            })
            .collect();
        let recv = ReceivePlan::new(&plan, &wants).unwrap();
        assert!(recv.pieces.iter().all(|p| p.len() == 1));
        let arena: Vec<u8> = (0..plan.arena_bytes()).map(|i| (i % 251) as u8).collect();
        let landing = land(&plan, &recv, &arena);
        for t in &recv.targets {
            let (o, n) = (t.landing_offset as usize, t.len as usize);
            let a = plan.offset(t.tensor) as usize;
            assert_eq!(landing[o..o + n], arena[a..a + n]);
        }
    }

    #[test]
    fn a_slice_subscriber_gets_exactly_its_rows_in_order() {
        // experts: [6, 4, 5] float32 = 80 B per expert, 480 B total; bucket 256 forces splits.
        let plan = BucketPlan::new(
            vec![spec("w", &[3, 7], 4), spec("experts", &[6, 4, 5], 4)],
            256,
        )
        .unwrap();
        let rows = vec![4..6, 1..2];
        let recv = ReceivePlan::new(
            &plan,
            &[Want {
                tensor: 1,
                rows: Some(rows),
            }],
        )
        .unwrap();
        assert_eq!(
            recv.targets,
            vec![Target {
                tensor: 1,
                landing_offset: 0,
                len: 240
            }]
        );
        let arena: Vec<u8> = (0..plan.arena_bytes()).map(|i| (i % 253) as u8).collect();
        let landing = land(&plan, &recv, &arena);
        let e = plan.offset(1) as usize;
        let expert = |k: usize| &arena[e + 80 * k..e + 80 * (k + 1)];
        assert_eq!(&landing[0..80], expert(4));
        assert_eq!(&landing[80..160], expert(5));
        assert_eq!(&landing[160..240], expert(1));
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one row range
    fn rows_outside_the_tensor_are_refused() {
        let plan = BucketPlan::new(vec![spec("w", &[3, 7], 4)], 256).unwrap();
        let err = ReceivePlan::new(
            &plan,
            &[Want {
                tensor: 0,
                rows: Some(vec![2..4]),
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("w: row range 2..4"), "{err}");
    }
}
