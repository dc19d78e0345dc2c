//! Weight tensors as the models and backends read them, whatever file
//! they come from: a [`Matrix`] of rows in the file's element type, f32
//! vectors, and the [`Weights`] a model asks for them by GGUF name.

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

    /// A matrix of `rows` rows of `cols` values of type `ty` over `data`
    /// (mapped from a file or held in memory), or `None` when `data` is not
    /// exactly that size or a row is not a whole number of blocks.
    pub fn from_bytes(ty: GgmlType, cols: usize, rows: usize, data: TensorBytes) -> Option<Self> {
        if !cols.is_multiple_of(ty.block_len()) {
            return None;
        }
        let row_bytes = cols / ty.block_len() * ty.block_bytes();
        (row_bytes.checked_mul(rows)? == data.len()).then_some(Self {
            ty,
            rows,
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

/// Where a model's weights come from, named as in GGUF (`blk.0.attn_q.weight`,
/// …) and shaped as ggml orders dimensions (`cols` contiguous), whatever the
/// file format. Matrices come checked against the shape asked for.
pub trait Weights {
    /// Why a tensor could not be read.
    type Error;
    /// The matrix `name` of `rows` rows of `cols` values.
    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Matrix, Self::Error>;
    /// The vector `name` of `len` values, as f32.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, Self::Error>;
    /// Whether the optional tensor `name` is there.
    fn contains(&self, name: &str) -> bool;
}

impl Weights for Gguf {
    type Error = GgufError;

    fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Matrix, GgufError> {
        Matrix::load(self, name, cols, Some(rows))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, GgufError> {
        load_vector(self, name, len)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }
}
