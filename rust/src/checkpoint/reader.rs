//! Reading a checkpoint: every shard memory-mapped, tensors handed out as slices of the maps,
//! checksums verified per chunk and only for the chunks a read touches.
//!
//! A directory without `manifest.json` (a Hub checkpoint) opens too; its tensors can be read
//! but not verified. Tensors are found by name through the shard headers, so the number of
//! shards a checkpoint was saved with does not matter.
//!
//! The maps are private copy-on-write mappings: a caller may write to the memory it was handed
//! (torch tensors are writable) without changing the file; a later verification of that tensor
//! then fails, as it should.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapMut, MmapOptions};
use rayon::prelude::*;
use safetensors::Dtype;

use super::error::{CkptError, Result};
use super::format::{dtype_name, parse_header, HeaderTensor};
use super::manifest::{chunk_ranges, parse_hex, FileEntry, Manifest, PiecedTensor, MANIFEST_FILE};
use crate::checksum::xxh3_64;
use crate::interrupt::Cancel;

/// Where a tensor lives and what it should hash to.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Index of its shard (see [`Checkpoint::file_name`]).
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range within the file.
    pub start: usize,
    pub end: usize,
    /// Chunk hashes from the manifest (empty without one).
    chunks: Vec<u64>,
}

/// A memory-mapped shard.
struct Shard {
    name: String,
    path: PathBuf,
    map: MmapMut,
}

/// An open checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    chunk_bytes: Option<u64>,
    shards: Vec<Shard>,
    /// Files without tensors: (name, expected size, expected hash).
    other_files: Vec<(String, u64, u64)>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// Tensors stored in row pieces, by logical name (checked against the shards at open).
    pieces: BTreeMap<String, PiecedTensor>,
    bytes_read: AtomicU64,
}

impl Checkpoint {
    /// Open the checkpoint in `dir`: read the manifest (if any), map every shard, parse and
    /// cross-check every header. Reads no tensor data.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = if manifest_path.is_file() {
            let bytes = fs::read(&manifest_path).map_err(CkptError::io("read", &manifest_path))?;
            Some(Manifest::parse(&bytes, &manifest_path)?)
        } else if dir.is_dir() {
            None
        } else {
            return Err(CkptError::NotFound(format!(
                "no checkpoint directory {}",
                dir.display()
            )));
        };
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            chunk_bytes: manifest.as_ref().map(|m| m.chunk_bytes),
            shards: Vec::new(),
            other_files: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            pieces: BTreeMap::new(),
            bytes_read: AtomicU64::new(0),
        };
        match manifest {
            Some(manifest) => {
                manifest.check_pieces(&manifest_path)?;
                for (name, entry) in &manifest.files {
                    let path = dir.join(name);
                    let hash = parse_hex(&entry.xxh3, &manifest_path)?;
                    if !name.ends_with(".safetensors") {
                        checkpoint
                            .other_files
                            .push((name.clone(), entry.bytes, hash));
                        continue;
                    }
                    if !path.exists() {
                        return Err(missing_shard(&path, entry, &manifest));
                    }
                    let (shard, header_len, tensors) = map_shard(&path, Some(entry.bytes))?;
                    if xxh3_64(&shard.map[..header_len]) != hash {
                        return Err(CkptError::format(
                            &path,
                            "header checksum mismatch: the file is corrupt",
                        ));
                    }
                    checkpoint.add_shard(shard, tensors, Some(entry), &manifest_path)?;
                }
                checkpoint.pieces = manifest.pieces;
            }
            None => {
                let mut names: Vec<String> = fs::read_dir(dir)
                    .map_err(CkptError::io("list", dir))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".safetensors"))
                    .collect();
                names.sort();
                for name in names {
                    let (shard, _, tensors) = map_shard(&dir.join(&name), None)?;
                    checkpoint.add_shard(shard, tensors, None, &manifest_path)?;
                }
            }
        }
        Ok(checkpoint)
    }

    fn add_shard(
        &mut self,
        shard: Shard,
        tensors: Vec<HeaderTensor>,
        entry: Option<&FileEntry>,
        manifest_path: &Path,
    ) -> Result<()> {
        let file = self.shards.len();
        if let Some(entry) = entry {
            if entry.tensors.len() != tensors.len() {
                return Err(CkptError::format(
                    &shard.path,
                    format!(
                        "header lists {} tensors, the manifest {}",
                        tensors.len(),
                        entry.tensors.len()
                    ),
                ));
            }
        }
        for t in tensors {
            let chunks = match entry {
                None => Vec::new(),
                Some(entry) => {
                    let expected = entry.tensors.get(&t.name).ok_or_else(|| {
                        CkptError::format(
                            &shard.path,
                            format!("tensor {:?} is not in the manifest", t.name),
                        )
                    })?;
                    if expected.dtype != dtype_name(t.dtype)
                        || expected.shape != t.shape
                        || expected.offset != t.start as u64
                        || expected.bytes != (t.end - t.start) as u64
                    {
                        return Err(CkptError::format(
                            &shard.path,
                            format!("tensor {:?}: header and manifest disagree", t.name),
                        ));
                    }
                    expected
                        .chunks
                        .iter()
                        .map(|h| parse_hex(h, manifest_path))
                        .collect::<Result<Vec<u64>>>()?
                }
            };
            if self
                .by_name
                .insert(t.name.clone(), self.tensors.len())
                .is_some()
            {
                return Err(CkptError::format(
                    &shard.path,
                    format!("tensor {:?} appears in more than one shard", t.name),
                ));
            }
            self.tensors.push(TensorInfo {
                name: t.name,
                file,
                dtype: t.dtype,
                shape: t.shape,
                start: t.start,
                end: t.end,
                chunks,
            });
        }
        self.shards.push(shard);
        Ok(())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint has a manifest (and so can be verified).
    pub fn has_manifest(&self) -> bool {
        self.chunk_bytes.is_some()
    }

    /// Every tensor, in shard and file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensors stored in row pieces, by logical name (their pieces are in
    /// [`Checkpoint::tensors`] under the stored names the pieces give).
    pub fn pieces(&self) -> &BTreeMap<String, PiecedTensor> {
        &self.pieces
    }

    /// The file name of shard `file` (as in [`TensorInfo::file`]).
    pub fn file_name(&self, file: usize) -> &str {
        &self.shards[file].name
    }

    /// A tensor's description, or an error naming it.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| {
                CkptError::NotFound(format!(
                    "no tensor {name:?} in checkpoint {}",
                    self.dir.display()
                ))
            })
    }

    /// Bytes the reader has hashed or copied since it was opened.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// A tensor's bytes (a slice of the memory map), verified first when `verify`.
    pub fn tensor(&self, name: &str, verify: bool) -> Result<&[u8]> {
        let t = self.info(name)?;
        if verify {
            self.verify_range(t, 0, (t.end - t.start) as u64, &Cancel::never())?;
        }
        Ok(&self.shards[t.file].map[t.start..t.end])
    }

    /// Rows `start..stop` of a tensor (along its first dimension: the rows of a tensor-parallel
    /// shard, or a range of stacked experts). Only the chunks those rows overlap are read and,
    /// when `verify`, hashed.
    pub fn rows(&self, name: &str, start: usize, stop: usize, verify: bool) -> Result<&[u8]> {
        let t = self.info(name)?;
        let Some(&rows) = t.shape.first() else {
            return Err(CkptError::Invalid(format!(
                "tensor {name:?} is a scalar: it has no rows"
            )));
        };
        if start > stop || stop > rows {
            return Err(CkptError::Invalid(format!(
                "rows {start}..{stop} are out of range for tensor {name:?} with {rows} rows"
            )));
        }
        let row_bytes = (t.end - t.start).checked_div(rows).unwrap_or(0);
        let (lo, hi) = ((start * row_bytes) as u64, (stop * row_bytes) as u64);
        if verify {
            self.verify_range(t, lo, hi, &Cancel::never())?;
        }
        Ok(&self.shards[t.file].map[t.start + lo as usize..t.start + hi as usize])
    }

    /// Verify the chunks of `t` that overlap its bytes `lo..hi` (relative to the tensor).
    fn verify_range(&self, t: &TensorInfo, lo: u64, hi: u64, cancel: &Cancel) -> Result<()> {
        let Some(chunk_bytes) = self.chunk_bytes else {
            return Err(CkptError::Invalid(format!(
                "{} has no manifest, so tensor {:?} cannot be verified (read it with verify off)",
                self.dir.display(),
                t.name
            )));
        };
        if hi <= lo {
            return Ok(());
        }
        let first = (lo / chunk_bytes) as usize;
        let last = hi.div_ceil(chunk_bytes) as usize;
        let bytes = (t.end - t.start) as u64;
        let ranges: Vec<(u64, u64)> = chunk_ranges(bytes, chunk_bytes).collect();
        (first..last)
            .into_par_iter()
            .try_for_each(|c| self.verify_chunk(t, c, ranges[c], cancel))
    }

    fn verify_chunk(
        &self,
        t: &TensorInfo,
        c: usize,
        (s, e): (u64, u64),
        cancel: &Cancel,
    ) -> Result<()> {
        cancel.check()?;
        let shard = &self.shards[t.file];
        let data = &shard.map[t.start + s as usize..t.start + e as usize];
        self.bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if t.chunks.get(c) != Some(&xxh3_64(data)) {
            return Err(CkptError::Corrupt {
                path: shard.path.clone(),
                tensor: t.name.clone(),
                chunk: c,
                start: t.start as u64 + s,
                end: t.start as u64 + e,
            });
        }
        Ok(())
    }

    /// Verify every chunk of every tensor and every other file listed in the manifest, in
    /// parallel. The first mismatch found is returned, naming its file and tensor.
    pub fn verify_all(&self, cancel: &Cancel) -> Result<()> {
        let Some(chunk_bytes) = self.chunk_bytes else {
            return Err(CkptError::NotFound(format!(
                "{} has no {MANIFEST_FILE}: nothing to verify against",
                self.dir.display()
            )));
        };
        let work: Vec<(&TensorInfo, usize, (u64, u64))> = self
            .tensors
            .iter()
            .flat_map(|t| {
                chunk_ranges((t.end - t.start) as u64, chunk_bytes)
                    .enumerate()
                    .map(move |(c, r)| (t, c, r))
            })
            .collect();
        work.par_iter()
            .try_for_each(|&(t, c, r)| self.verify_chunk(t, c, r, cancel))?;
        for (name, _, _) in &self.other_files {
            self.read_file(name, true)?;
        }
        Ok(())
    }

    /// The contents of a non-tensor file of the checkpoint (JSON), checked against the manifest
    /// when `verify`.
    pub fn read_file(&self, name: &str, verify: bool) -> Result<Vec<u8>> {
        let path = self.dir.join(name);
        let bytes = fs::read(&path).map_err(CkptError::io("read", &path))?;
        self.bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if verify {
            let Some((_, size, hash)) = self.other_files.iter().find(|(n, _, _)| n == name) else {
                return Err(CkptError::NotFound(format!(
                    "{name:?} is not listed in the manifest of {}",
                    self.dir.display()
                )));
            };
            if bytes.len() as u64 != *size || xxh3_64(&bytes) != *hash {
                return Err(CkptError::format(
                    &path,
                    "checksum mismatch: the file is corrupt",
                ));
            }
        }
        Ok(bytes)
    }
}

/// The error for a shard the manifest lists but the directory lacks, naming the tensors it held
/// (for a piece, the whole tensor it is part of).
fn missing_shard(path: &Path, entry: &FileEntry, manifest: &Manifest) -> CkptError {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut held: Vec<String> = Vec::new();
    for name in entry.tensors.keys() {
        let whole = manifest.pieces.iter().find(|(_, p)| {
            p.pieces
                .iter()
                .any(|piece| piece.file == file && &piece.tensor == name)
        });
        held.push(match whole {
            Some((logical, _)) => format!("{name:?} (rows of {logical:?})"),
            None => format!("{name:?}"),
        });
    }
    let more = held.len().saturating_sub(5);
    held.truncate(5);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    CkptError::format(
        path,
        format!(
            "the shard is missing: the manifest lists it with tensor(s) {}{tail}",
            held.join(", ")
        ),
    )
}

/// Open and map one shard; check its size against the manifest first when known.
fn map_shard(
    path: &Path,
    expected_bytes: Option<u64>,
) -> Result<(Shard, usize, Vec<HeaderTensor>)> {
    let file = File::open(path).map_err(CkptError::io("open", path))?;
    let len = file.metadata().map_err(CkptError::io("stat", path))?.len();
    if let Some(expected) = expected_bytes {
        if len != expected {
            return Err(CkptError::format(
                path,
                format!("{len} bytes on disk, the manifest says {expected}: truncated or corrupt"),
            ));
        }
    }
    if len < 8 {
        return Err(CkptError::format(
            path,
            format!("truncated: {len} bytes is too short for a safetensors header"),
        ));
    }
    // SAFETY: a private (copy-on-write) mapping: writes through it never reach the file. The
    // usual mmap caveat remains: another process truncating the file while it is mapped makes
    // reads fault. Checkpoints are written once, into a new directory, and never modified.
    let map = unsafe { MmapOptions::new().map_copy(&file) }.map_err(CkptError::io("map", path))?;
    let (header_len, tensors) = parse_header(&map, path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((
        Shard {
            name,
            path: path.to_path_buf(),
            map,
        },
        header_len,
        tensors,
    ))
}
