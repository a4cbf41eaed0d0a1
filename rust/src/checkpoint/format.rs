//! The safetensors file format: laying out a shard and encoding its header (through the
//! `safetensors` crate, so the JSON is the reference one), and parsing a header defensively.
//!
//! A file is `u64 little-endian N`, `N` bytes of JSON (padded with spaces to a multiple of 8),
//! then the tensors' bytes back to back. Tensors are laid out by decreasing element size, so with
//! the 8-byte aligned header every tensor starts at a multiple of its element size.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use super::error::{CkptError, Result};

/// The largest header the reader accepts (the safetensors crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Parse a safetensors dtype name (`"BF16"`, `"F8_E4M3"`, ...).
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .map_err(|_| CkptError::Invalid(format!("unknown safetensors dtype {name:?}")))
}

/// The name of a dtype as safetensors writes it.
pub fn dtype_name(dtype: Dtype) -> String {
    match serde_json::to_value(dtype) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("safetensors dtypes serialize as strings"),
    }
}

/// Bytes a tensor of `dtype` and `shape` occupies, or an error naming `name`.
pub fn tensor_bytes(name: &str, dtype: Dtype, shape: &[usize]) -> Result<usize> {
    let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let bits = elements.and_then(|n| n.checked_mul(dtype.bitsize()));
    match bits {
        Some(bits) if bits % 8 == 0 => Ok(bits / 8),
        _ => Err(CkptError::Invalid(format!(
            "tensor {name:?}: shape {shape:?} is not whole bytes"
        ))),
    }
}

/// A tensor placed in a shard: where its bytes go, relative to the start of the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    /// Index of the tensor in the list given to [`layout`].
    pub index: usize,
    pub start: usize,
    pub end: usize,
}

/// Data layout unit: page-sized tensors start on page boundaries (see [`layout`]).
const PAGE_BYTES: usize = 4096;

/// Lay out tensors `(name, dtype, shape)` in a shard and encode its header.
///
/// Returns the full header (length prefix included, so data starts at `header.len()`) and the
/// placement of each tensor, in file order.
pub fn layout(tensors: &[(&str, Dtype, &[usize])]) -> Result<(Vec<u8>, Vec<Placed>)> {
    let mut sizes = Vec::with_capacity(tensors.len());
    for &(name, dtype, shape) in tensors {
        sizes.push(tensor_bytes(name, dtype, shape)?);
    }
    // Tensors whose size is a whole number of pages first, from a page-aligned data start, so
    // every one of them starts on a page boundary: the kernel then copies whole pages into the
    // page cache, about 1.5x faster than when a small tensor in between shifts everything after
    // it. The rest follow by element size, largest first, which keeps each tensor aligned to its
    // element size. Stable: within a class the caller's order is kept.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| {
        let whole_pages = sizes[i] > 0 && sizes[i] % PAGE_BYTES == 0;
        (!whole_pages, std::cmp::Reverse(tensors[i].1.bitsize()))
    });
    let mut placed = Vec::with_capacity(tensors.len());
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for index in order {
        let (name, dtype, shape) = tensors[index];
        let bytes = sizes[index];
        placed.push(Placed {
            index,
            start: offset,
            end: offset + bytes,
        });
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + bytes),
            },
        ));
        offset += bytes;
    }
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(format), infos)
        .map_err(|e| CkptError::Invalid(format!("cannot lay out shard: {e}")))?;
    let mut json = serde_json::to_vec(&metadata).expect("safetensors metadata serializes");
    // Spaces after the JSON are allowed; the data starts on a page boundary.
    json.resize((8 + json.len()).next_multiple_of(PAGE_BYTES) - 8, b' ');
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    Ok((header, placed))
}

/// A tensor as a parsed header describes it; offsets are from the start of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// Parse the header of a whole safetensors file held in `buf` (normally a memory map).
///
/// Never allocates in proportion to what the header claims: the length is checked against the
/// file size and [`MAX_HEADER_BYTES`] before anything is read. Returns the header length
/// (prefix included) and the tensors in file order.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<(usize, Vec<HeaderTensor>)> {
    let file_len = buf.len() as u64;
    let Some(prefix) = buf.get(..8) else {
        return Err(CkptError::format(
            path,
            format!("truncated: {file_len} bytes is too short for a safetensors header"),
        ));
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(CkptError::format(
            path,
            format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: not a safetensors file, or corrupt"),
        ));
    }
    if 8 + n > file_len {
        return Err(CkptError::format(
            path,
            format!("header length {n} runs past the end of the file ({file_len} bytes): truncated or corrupt"),
        ));
    }
    let (_, metadata) = SafeTensors::read_metadata(buf).map_err(|e| {
        let msg = match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => format!(
                "file size {file_len} does not match the tensors its header lists: truncated or corrupt"
            ),
            other => format!("bad safetensors header: {other}"),
        };
        CkptError::format(path, msg)
    })?;
    let data_start = 8 + n as usize;
    let tensors = metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = metadata
                .info(&name)
                .expect("offset_keys names known tensors");
            let (s, e) = info.data_offsets;
            HeaderTensor {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            }
        })
        .collect();
    Ok((data_start, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_every_tensor_to_its_element_size() {
        let (header, placed) = layout(&[
            ("byte", Dtype::U8, &[3]),
            ("half", Dtype::BF16, &[5]),
            ("double", Dtype::F64, &[2]),
        ])
        .unwrap();
        assert_eq!(header.len() % 8, 0);
        // Widest first: the F64, then the BF16, then the U8.
        let order: Vec<usize> = placed.iter().map(|p| p.index).collect();
        assert_eq!(order, vec![2, 1, 0]);
        assert_eq!((placed[0].start, placed[0].end), (0, 16));
        assert_eq!((placed[1].start, placed[1].end), (16, 26));
    }

    #[test]
    fn a_laid_out_header_parses_back() {
        let (mut file, placed) =
            layout(&[("w", Dtype::F32, &[2, 3]), ("b", Dtype::F32, &[3])]).unwrap();
        let data_start = file.len();
        file.resize(data_start + placed.last().unwrap().end, 0);
        let (start, tensors) = parse_header(&file, Path::new("x.safetensors")).unwrap();
        assert_eq!(start, data_start);
        assert_eq!(tensors[0].name, "w");
        assert_eq!(tensors[0].shape, vec![2, 3]);
        assert_eq!(
            (tensors[1].start, tensors[1].end),
            (data_start + 24, data_start + 36)
        );
    }

    #[test]
    fn absurd_or_truncated_headers_are_clear_errors() {
        let path = Path::new("bad.safetensors");
        let err = parse_header(&[1, 2, 3], path).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let err = parse_header(&u64::MAX.to_le_bytes(), path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds"), "{err}");
        let mut buf = 1000u64.to_le_bytes().to_vec();
        buf.extend_from_slice(b"{}      ");
        let err = parse_header(&buf, path).unwrap_err().to_string();
        assert!(
            err.contains("past the end") && err.contains("bad.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_data_section_is_reported() {
        let (mut file, _) = layout(&[("w", Dtype::F32, &[4])]).unwrap();
        file.extend_from_slice(&[0u8; 10]); // 16 bytes expected
        let err = parse_header(&file, Path::new("t.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn dtype_names_round_trip() {
        for name in ["BF16", "F32", "F8_E4M3", "I64", "BOOL"] {
            assert_eq!(dtype_name(parse_dtype(name).unwrap()), name);
        }
        assert!(parse_dtype("F128").is_err());
    }
}
