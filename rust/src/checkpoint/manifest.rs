//! `manifest.json`: the size of every file in a checkpoint and the XXH3-64 of every tensor chunk.
//!
//! A tensor's bytes are cut into chunks of `chunk_bytes` counted from the tensor's first byte
//! (the last chunk may be shorter), so an error names the tensor and the chunk, and a slice read
//! hashes only the chunks it touches. Files that hold no tensors (JSON) get one hash of the
//! whole file. Hashes are written as 16 hex digits, which every JSON reader keeps exactly.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{CkptError, Result};

/// The file name of the manifest inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The `format` field every k2 manifest carries.
pub const FORMAT: &str = "k2-checkpoint";
/// The manifest layout version this code writes and reads.
pub const VERSION: u32 = 1;

/// The whole manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Chunk size of every tensor's checksums, in bytes.
    pub chunk_bytes: u64,
    /// Every file of the checkpoint except the manifest itself, by file name.
    pub files: BTreeMap<String, FileEntry>,
    /// Tensors stored in row pieces (a sharded run's per-rank writes), by logical name; see
    /// [`PiecedTensor`]. Absent when every tensor is stored whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pieces: BTreeMap<String, PiecedTensor>,
}

/// A tensor stored as row ranges in several stored tensors (each rank of a sharded run writes
/// the rows it holds). The pieces, in row order, cover rows `0..shape[0]` exactly once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PiecedTensor {
    /// safetensors dtype name of the whole tensor (every piece has it).
    pub dtype: String,
    /// The whole tensor's shape; a piece has `[stop - start, shape[1..]]`.
    pub shape: Vec<usize>,
    pub pieces: Vec<Piece>,
}

/// One row range of a [`PiecedTensor`]: rows `rows[0]..rows[1]`, stored as tensor `tensor` of
/// shard `file`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Piece {
    pub file: String,
    pub tensor: String,
    pub rows: [usize; 2],
}

/// One file of the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct FileEntry {
    /// File size in bytes.
    pub bytes: u64,
    /// XXH3-64 of the whole file (files without tensors) or of the safetensors header
    /// (the 8-byte length and the JSON) for shards.
    pub xxh3: String,
    /// The tensors of a safetensors shard, by name (empty for other files).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// One tensor of a shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorEntry {
    /// safetensors dtype name (`BF16`, `F32`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Offset of the tensor's first byte from the start of the file.
    pub offset: u64,
    pub bytes: u64,
    /// XXH3-64 of each chunk, as 16 hex digits.
    pub chunks: Vec<String>,
}

impl Manifest {
    /// An empty manifest with the given chunk size.
    pub fn new(chunk_bytes: u64) -> Self {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            chunk_bytes,
            files: BTreeMap::new(),
            pieces: BTreeMap::new(),
        }
    }

    /// Check the pieced tensors against the files: every piece is a stored tensor of the shard
    /// it names, of the whole tensor's dtype and trailing shape, and the pieces, in row order,
    /// cover the rows exactly (no gap, no overlap). Errors name the manifest `path`, the tensor
    /// and the shard file at fault.
    pub fn check_pieces(&self, path: &Path) -> Result<()> {
        for (name, pieced) in &self.pieces {
            let bad = |msg: String| CkptError::format(path, format!("tensor {name:?}: {msg}"));
            let Some(&rows) = pieced.shape.first() else {
                return Err(bad("a scalar cannot be stored in row pieces".into()));
            };
            if self.files.values().any(|f| f.tensors.contains_key(name)) {
                return Err(bad("it is stored whole and in pieces".into()));
            }
            let mut order: Vec<&Piece> = pieced.pieces.iter().collect();
            order.sort_by_key(|p| (p.rows[0], p.rows[1]));
            let mut covered = 0usize;
            let mut previous: Option<&Piece> = None;
            for piece in order {
                let [start, stop] = piece.rows;
                let what = format!(
                    "piece {:?} (rows {start}..{stop}) in {}",
                    piece.tensor, piece.file
                );
                let stored = self
                    .files
                    .get(&piece.file)
                    .ok_or_else(|| {
                        bad(format!(
                            "{what}: the manifest lists no shard {:?}",
                            piece.file
                        ))
                    })?
                    .tensors
                    .get(&piece.tensor)
                    .ok_or_else(|| {
                        bad(format!(
                            "{what}: {} holds no tensor {:?}",
                            piece.file, piece.tensor
                        ))
                    })?;
                if start >= stop || stop > rows {
                    return Err(bad(format!("{what}: not a row range of its {rows} rows")));
                }
                let mut shape = pieced.shape.clone();
                shape[0] = stop - start;
                if stored.dtype != pieced.dtype || stored.shape != shape {
                    return Err(bad(format!(
                        "{what}: stored as {} {:?}, the rows need {} {:?}",
                        stored.dtype, stored.shape, pieced.dtype, shape
                    )));
                }
                if start < covered {
                    let other = previous.expect("covered > 0 after a piece");
                    return Err(bad(format!(
                        "{what} overlaps piece {:?} (rows {}..{}) in {}",
                        other.tensor, other.rows[0], other.rows[1], other.file
                    )));
                }
                if start > covered {
                    return Err(bad(format!(
                        "rows {covered}..{start} are in no piece (a piece is missing before {what})"
                    )));
                }
                covered = stop;
                previous = Some(piece);
            }
            if covered != rows {
                return Err(bad(format!(
                    "rows {covered}..{rows} are in no piece (a piece is missing)"
                )));
            }
        }
        Ok(())
    }

    /// Parse a manifest read from `path`, checking its format and version.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| CkptError::format(path, format!("not a valid k2 manifest: {e}")))?;
        if manifest.format != FORMAT || manifest.version != VERSION {
            return Err(CkptError::format(
                path,
                format!(
                    "manifest format {:?} version {} is not {FORMAT:?} version {VERSION}",
                    manifest.format, manifest.version
                ),
            ));
        }
        if manifest.chunk_bytes == 0 {
            return Err(CkptError::format(path, "manifest chunk_bytes is 0"));
        }
        Ok(manifest)
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serializes")
    }
}

/// A hash as the manifest writes it.
pub fn hex(hash: u64) -> String {
    format!("{hash:016x}")
}

/// A hash from the manifest, or a format error naming `path`.
pub fn parse_hex(text: &str, path: &Path) -> Result<u64> {
    u64::from_str_radix(text, 16)
        .map_err(|_| CkptError::format(path, format!("bad checksum {text:?} in manifest")))
}

/// The byte ranges (relative to the tensor's start) of its chunks.
pub fn chunk_ranges(bytes: u64, chunk_bytes: u64) -> impl Iterator<Item = (u64, u64)> {
    let n = bytes.div_ceil(chunk_bytes);
    (0..n).map(move |i| (i * chunk_bytes, ((i + 1) * chunk_bytes).min(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_through_hex() {
        for h in [0u64, 1, u64::MAX, 0x2D06_8005_38D3_94C2] {
            assert_eq!(parse_hex(&hex(h), Path::new("m")).unwrap(), h);
        }
        assert!(parse_hex("xyz", Path::new("m")).is_err());
    }

    #[test]
    fn chunks_cover_the_tensor_exactly() {
        let ranges: Vec<_> = chunk_ranges(10, 4).collect();
        assert_eq!(ranges, vec![(0, 4), (4, 8), (8, 10)]);
        assert_eq!(chunk_ranges(0, 4).count(), 0);
        assert_eq!(chunk_ranges(8, 4).count(), 2);
    }

    #[test]
    fn a_foreign_json_is_rejected_with_the_path() {
        let err = Manifest::parse(
            br#"{"format": "x", "version": 1, "chunk_bytes": 4, "files": {}}"#,
            Path::new("/c/manifest.json"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/c/manifest.json"), "{err}");
    }
}
