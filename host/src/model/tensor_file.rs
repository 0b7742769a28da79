//! One `.safetensors` file, memory-mapped: its header read into the `safetensors` crate's types
//! and its tensors as the crate's views over the map.
//!
//! The crate's own reader (`SafeTensors::read_metadata`) is not used: its errors name neither
//! the tensor nor the field at fault, and with overflow checks on (as cargo-fuzz builds) a
//! header whose offsets end near `usize::MAX` makes it panic. Here the header is deserialized
//! into the crate's `Metadata` and checked with checked arithmetic against the format's rules
//! (every tensor's bytes match its shape and dtype, the tensors tile the data section with no
//! overlap and no hole), each fault with a message that names the tensor.

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Largest header the format allows (the `safetensors` crate's and HF's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A memory-mapped safetensors file with its checked header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Every tensor by name; `data_offsets` are relative to the start of the data section.
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsFile {
    /// Maps `path` and checks its header with [`parse_header`]; errors name the file.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a checkpoint being rewritten while we load it is outside
        // what we can defend against (every loader that maps files shares this caveat).
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (data_start, tensors) = parse_header(&mmap).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start, tensors })
    }

    /// The tensor `name`, as a view of its bytes in the map.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.tensors.get(name).ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        let (begin, end) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + begin..self.data_start + end];
        TensorView::new(info.dtype, info.shape.clone(), bytes)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))
    }
}

/// Reads and checks the header of a whole safetensors file held in `bytes`: the header length
/// within the file, the header a JSON object of well-formed tensor entries (the crate's
/// `Metadata`), and every tensor's byte range matching its shape and lying inside the data
/// section, which the tensors cover without overlap or hole. Returns where the data section
/// starts and the tensors by name. Never panics, whatever the bytes (see fuzz/).
pub fn parse_header(bytes: &[u8]) -> Result<(usize, BTreeMap<String, TensorInfo>)> {
    let file_len = bytes.len();
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        bail!("file is {file_len} bytes, too short for a safetensors header");
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > (file_len - 8) as u64 {
        bail!(
            "header length {header_len} goes beyond the end of the file ({file_len} bytes); \
             the file is truncated or not safetensors"
        );
    }
    if header_len > MAX_HEADER_BYTES {
        bail!("header length {header_len} is more than the format allows ({MAX_HEADER_BYTES} bytes)");
    }
    let data_start = 8 + header_len as usize;
    let header = &bytes[8..data_start];
    let metadata: Metadata = serde_json::from_slice(header).map_err(|e| explain_header(header, e))?;
    let tensors: BTreeMap<String, TensorInfo> =
        metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
    check_layout(&tensors, file_len - data_start)?;
    Ok((data_start, tensors))
}

/// Each tensor's bytes match its shape and dtype and lie inside a data section of `data_len`
/// bytes; together the tensors cover it exactly, as the format requires.
fn check_layout(tensors: &BTreeMap<String, TensorInfo>, data_len: usize) -> Result<()> {
    for (name, info) in tensors {
        let (begin, end) = info.data_offsets;
        if begin > end {
            bail!("tensor `{name}`: `data_offsets` [{begin}, {end}] run backwards");
        }
        let elements = info.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let needed = elements.and_then(|e| e.checked_mul(info.dtype.size()));
        if needed != Some(end - begin) {
            bail!(
                "tensor `{name}`: shape {:?} of {:?} needs {} bytes but `data_offsets` [{begin}, {end}] span {}",
                info.shape,
                info.dtype,
                needed.map(|b| b.to_string()).unwrap_or_else(|| "too many".into()),
                end - begin
            );
        }
    }
    let mut ranges: Vec<(&String, (usize, usize))> = tensors.iter().map(|(n, i)| (n, i.data_offsets)).collect();
    ranges.sort_by_key(|&(_, range)| range);
    let beyond: Vec<_> = ranges.iter().filter(|&&(_, (_, end))| end > data_len).collect();
    if let Some(&&(name, (begin, end))) = beyond.first() {
        let more = match beyond.len() - 1 {
            0 => String::new(),
            n => format!(", and {n} more tensor(s) after it"),
        };
        bail!(
            "tensor `{name}` lies at bytes {begin}..{end} but the data section has only {data_len} bytes{more}; \
             the file is truncated"
        );
    }
    // Overlaps first: two tensors sharing bytes is the likelier fault behind a hole, too.
    let mut covering: Option<(&String, (usize, usize))> = None;
    for &(name, (begin, end)) in &ranges {
        if let Some((other, (b, e))) = covering.filter(|&(_, (_, e))| begin < e) {
            bail!("tensors `{other}` (bytes {b}..{e}) and `{name}` (bytes {begin}..{end}) overlap in the data section");
        }
        if covering.is_none_or(|(_, (_, e))| end >= e) {
            covering = Some((name, (begin, end)));
        }
    }
    let mut covered = 0;
    for &(name, (begin, end)) in &ranges {
        if begin > covered {
            bail!("bytes {covered}..{begin} of the data section belong to no tensor (the next is `{name}`)");
        }
        covered = end;
    }
    if covered < data_len {
        bail!("the data section has {} bytes after the last tensor's end ({covered})", data_len - covered);
    }
    Ok(())
}

/// Why `header` is not a safetensors header the crate can read (`err`, serde's view of it),
/// naming the tensor and the field at fault where there is one.
fn explain_header(header: &[u8], err: serde_json::Error) -> anyhow::Error {
    let value: Value = match serde_json::from_slice(header) {
        Ok(v) => v,
        Err(e) => return anyhow!("safetensors header is not valid JSON: {e}"),
    };
    let Some(entries) = value.as_object() else {
        return anyhow!("safetensors header is not a JSON object");
    };
    for (name, entry) in entries {
        let fault = if name == "__metadata__" {
            field::<HashMap<String, String>>(entry, "`__metadata__`").err()
        } else {
            entry_fault(entry).map(|e| anyhow!("tensor `{name}` has a malformed header entry: {e:#}"))
        };
        if let Some(fault) = fault {
            return fault;
        }
    }
    anyhow!("safetensors header does not parse: {err}")
}

/// What is wrong with one tensor's header entry, field by field, if anything.
fn entry_fault(entry: &Value) -> Option<anyhow::Error> {
    let Some(fields) = entry.as_object() else {
        return Some(anyhow!("the entry is not an object"));
    };
    let check = || -> Result<()> {
        if let Some(key) = ["dtype", "shape", "data_offsets"].into_iter().find(|k| !fields.contains_key(*k)) {
            bail!("`{key}` is missing");
        }
        field::<Dtype>(&fields["dtype"], "`dtype`")?;
        field::<Vec<usize>>(&fields["shape"], "`shape`")?;
        field::<(usize, usize)>(&fields["data_offsets"], "`data_offsets`")?;
        field::<TensorInfo>(entry, "the entry")
    };
    check().err()
}

/// `value` deserialized as a `T`, or an error that starts with `what`.
fn field<T: DeserializeOwned>(value: &Value, what: &str) -> Result<()> {
    serde_json::from_value::<T>(value.clone()).map(drop).map_err(|e| anyhow!("{what}: {e}"))
}
