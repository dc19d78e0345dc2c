//! Where the arithmetic runs. The model code says *what* to compute
//! (matmul, rmsnorm, …) and a backend decides *how*; today that is
//! [`cpu::CpuBackend`], and a CUDA backend will sit beside it.

pub mod cpu;

use crate::gguf::{Gguf, GgufError, TensorBytes};
use crate::quant::GgmlType;

/// A weight matrix as stored in the model file: `rows` rows of `cols`
/// values, each row contiguous and (for quantized types) a whole number of
/// blocks.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Element type.
    pub ty: GgmlType,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    data: TensorBytes,
    row_bytes: usize,
}

impl Matrix {
    /// The 2-D tensor `name` from `gguf`, which must have `cols` columns
    /// (ggml's `ne0`) and, when `rows` is given, that many rows.
    pub fn load(
        gguf: &Gguf,
        name: &str,
        cols: usize,
        rows: Option<usize>,
    ) -> Result<Self, GgufError> {
        let (info, data) = gguf.tensor_bytes(name)?;
        let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
        let shape_ok = match (dims.as_slice(), rows) {
            ([c, r], Some(rows)) => *c == cols && *r == rows,
            ([c, _], None) => *c == cols,
            _ => false,
        };
        if !shape_ok {
            return Err(GgufError::BadTensorShape {
                name: name.to_owned(),
                reason: format!("dims {:?}, expected [{cols}, {rows:?}]", info.dims),
            });
        }
        let row_bytes = cols / info.ty.block_len() * info.ty.block_bytes();
        Ok(Self {
            ty: info.ty,
            rows: dims[1],
            cols,
            data,
            row_bytes,
        })
    }

    /// The raw bytes of row `r`.
    ///
    /// # Panics
    ///
    /// If `r >= self.rows`.
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// A 1-D f32 weight vector (norm weights), copied out of the file.
pub fn load_vector(gguf: &Gguf, name: &str, len: usize) -> Result<Vec<f32>, GgufError> {
    let (info, data) = gguf.tensor_bytes(name)?;
    if info.dims != [len as u64] {
        return Err(GgufError::BadTensorShape {
            name: name.to_owned(),
            reason: format!("dims {:?}, expected [{len}]", info.dims),
        });
    }
    let mut out = vec![0.0; len];
    crate::quant::dequantize_row(info.ty, &data, &mut out);
    Ok(out)
}
