//! The tensors of a model's `*.safetensors` files, memory-mapped, and the
//! llama weights read from them.
//!
//! F32 and F16 matrices are used in place, straight from the map. BF16 ones
//! are converted at load: to F16 when every value is within F16's range
//! (exact for all but values under 2⁻¹⁴, which lose low bits), else to F32.
//! The query and key projections are copied to reorder their rows (see
//! [`permute_rope_rows`]).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{HfError, INDEX_FILE, read_json};
use crate::gguf::TensorBytes;
use crate::quant::{GgmlType, dequantize_row};
use crate::weights::Matrix;

/// Where one tensor is.
#[derive(Debug, Clone)]
struct Entry {
    /// Index into [`Tensors::files`].
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range within the file.
    range: Range<usize>,
}

/// Every tensor of a model's weight files, by name.
#[derive(Debug)]
pub struct Tensors {
    dir: PathBuf,
    /// Each weight file and its whole mapped contents.
    files: Vec<(PathBuf, TensorBytes)>,
    entries: HashMap<String, Entry>,
}

impl Tensors {
    /// Maps the weight files of `dir`: those `model.safetensors.index.json`
    /// lists, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let index = dir.join(INDEX_FILE);
        let mut names: Vec<String> = if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| HfError::Invalid {
                    path: index.clone(),
                    reason: "no weight_map object".into(),
                })?;
            map.values()
                .map(|f| {
                    f.as_str()
                        .filter(|f| !f.contains('/') && !f.contains('\\') && *f != "..")
                        .map(str::to_owned)
                        .ok_or_else(|| HfError::Invalid {
                            path: index.clone(),
                            reason: format!("weight_map names {f} as a file"),
                        })
                })
                .collect::<Result<_, _>>()?
        } else {
            let io = |source| HfError::Io {
                path: dir.to_owned(),
                source,
            };
            let mut names = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(io)? {
                let name = entry.map_err(io)?.file_name();
                if let Some(name) = name.to_str().filter(|n| n.ends_with(".safetensors")) {
                    names.push(name.to_owned());
                }
            }
            names
        };
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(HfError::NoWeights {
                dir: dir.to_owned(),
            });
        }

        let mut files: Vec<(PathBuf, TensorBytes)> = Vec::with_capacity(names.len());
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for name in names {
            let path = dir.join(name);
            let bytes = TensorBytes::map_file(&path).map_err(|source| HfError::Io {
                path: path.clone(),
                source,
            })?;
            let (header, metadata) =
                SafeTensors::read_metadata(&bytes).map_err(|e| HfError::Invalid {
                    path: path.clone(),
                    reason: format!("not a valid safetensors file: {e}"),
                })?;
            let data_start = 8 + header;
            for (tensor, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    file: files.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: data_start + start..data_start + end,
                };
                if let Some(other) = entries.insert(tensor.clone(), entry) {
                    let other = &files[other.file].0;
                    return Err(HfError::Invalid {
                        path,
                        reason: format!("tensor {tensor:?} is also in {}", other.display()),
                    });
                }
            }
            files.push((path, bytes));
        }
        Ok(Self {
            dir: dir.to_owned(),
            files,
            entries,
        })
    }

    /// Whether a tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn entry(&self, name: &str) -> Result<&Entry, HfError> {
        self.entries
            .get(name)
            .ok_or_else(|| HfError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_owned(),
            })
    }

    fn bad(&self, entry: &Entry, name: &str, reason: String) -> HfError {
        HfError::BadTensor {
            path: self.files[entry.file].0.clone(),
            name: name.to_owned(),
            reason,
        }
    }

    /// The tensor `name`, which must have `shape` (outermost first, as
    /// PyTorch writes it), as a ggml type this crate multiplies (F32 or
    /// F16) and its bytes: mapped for F32 and F16, converted for BF16.
    fn float_bytes(&self, name: &str, shape: &[usize]) -> Result<(GgmlType, TensorBytes), HfError> {
        let entry = self.entry(name)?;
        if entry.shape != shape {
            return Err(self.bad(
                entry,
                name,
                format!("shape {:?}, expected {shape:?}", entry.shape),
            ));
        }
        let bytes = self.files[entry.file].1.slice(entry.range.clone());
        match entry.dtype {
            Dtype::F32 => Ok((GgmlType::F32, bytes)),
            Dtype::F16 => Ok((GgmlType::F16, bytes)),
            Dtype::BF16 => Ok(bf16_to_f16_or_f32(&bytes)),
            other => Err(self.bad(
                entry,
                name,
                format!("dtype {other:?} is not supported (F32, F16, BF16 are)"),
            )),
        }
    }

    /// The 2-D tensor `name` of `rows` × `cols` as a matrix, its rows
    /// reordered for RoPE when `rope_heads` is given.
    pub fn matrix(
        &self,
        name: &str,
        cols: usize,
        rows: usize,
        rope_heads: Option<usize>,
    ) -> Result<Matrix, HfError> {
        let (ty, mut bytes) = self.float_bytes(name, &[rows, cols])?;
        if let Some(heads) = rope_heads {
            bytes = TensorBytes::owned(permute_rope_rows(&bytes, rows, heads));
        }
        Matrix::from_bytes(ty, cols, rows, bytes).ok_or_else(|| {
            let entry = &self.entries[name];
            self.bad(
                entry,
                name,
                format!("{rows} rows of {cols} {ty:?} values do not fit"),
            )
        })
    }

    /// The 1-D tensor `name` of `len` values, as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, HfError> {
        let (ty, bytes) = self.float_bytes(name, &[len])?;
        let mut out = vec![0.0; len];
        dequantize_row(ty, &bytes, &mut out);
        Ok(out)
    }
}

/// BF16 values as F16 when all fit its range, else as F32.
fn bf16_to_f16_or_f32(bytes: &[u8]) -> (GgmlType, TensorBytes) {
    let values = || {
        bytes
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
    };
    let max = f32::from(f16::MAX);
    if values().all(|v| v.abs() <= max) {
        let out = values()
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect();
        (GgmlType::F16, TensorBytes::owned(out))
    } else {
        let out = values().flat_map(f32::to_le_bytes).collect();
        (GgmlType::F32, TensorBytes::owned(out))
    }
}

/// Reorders the rows of a query or key projection of `heads` heads from
/// Hugging Face's RoPE layout, which rotates dimension `i` of a head with
/// `i + head_dim/2`, to ggml's, which rotates `2i` with `2i + 1`: row
/// `h·d + 2i + j` of the result is row `h·d + j·d/2 + i` of `src` (`d` the
/// head size, `j` 0 or 1). This is llama.cpp's `convert_hf_to_gguf.py`
/// `permute`: `reshape(heads, 2, d/2, cols).swapaxes(1, 2)`.
///
/// # Panics
///
/// If `rows` is not a multiple of `2 · heads` or `src` not a multiple of
/// `rows`.
pub fn permute_rope_rows(src: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    assert!(
        heads > 0 && rows.is_multiple_of(2 * heads),
        "{rows} rows over {heads} heads"
    );
    assert_eq!(src.len() % rows, 0, "whole rows");
    let row_bytes = src.len() / rows;
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(src.len());
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let r = h * 2 * half + j * half + i;
                out.extend_from_slice(&src[r * row_bytes..(r + 1) * row_bytes]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutes_like_llama_cpp() {
        // Two heads of four rows; one byte per row is its index.
        let src: Vec<u8> = (0..8).collect();
        // reshape(2, 2, 2) → swapaxes(1, 2): head 0 rows [0, 2, 1, 3].
        assert_eq!(permute_rope_rows(&src, 8, 2), [0, 2, 1, 3, 4, 6, 5, 7]);
        let src: Vec<u8> = (0..8).collect();
        assert_eq!(permute_rope_rows(&src, 8, 1), [0, 4, 1, 5, 2, 6, 3, 7]);
    }

    #[test]
    fn bf16_becomes_f16_in_range_and_f32_beyond() {
        let bytes = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect()
        };
        let (ty, out) = bf16_to_f16_or_f32(&bytes(&[1.5, -0.25, 3.0e4]));
        assert_eq!(ty, GgmlType::F16);
        let mut v = [0.0; 3];
        dequantize_row(ty, &out, &mut v);
        assert_eq!(v, [1.5, -0.25, 29952.0]);
        let (ty, out) = bf16_to_f16_or_f32(&bytes(&[1.0, 1.0e6]));
        assert_eq!(ty, GgmlType::F32);
        let mut v = [0.0; 2];
        dequantize_row(ty, &out, &mut v);
        assert_eq!(v, [1.0, bf16::from_f32(1.0e6).to_f32()]);
    }
}
