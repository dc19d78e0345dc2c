//! A llama's weights on the device: dequantized to f16 once, the q/k/v and
//! gate/up projections fused into one matrix each.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::f16;
use rayon::prelude::*;

use super::super::CudaError;
use crate::model::llama::Llama;
use crate::quant::dequantize_row;
use crate::weights::Matrix;

/// One layer's weights on the device.
pub(super) struct LayerWeights {
    pub(super) attn_norm: CudaSlice<f32>,
    /// `[wq; wk; wv]`, `(dim + 2·kv_dim) × dim`.
    pub(super) wqkv: CudaSlice<u16>,
    pub(super) wo: CudaSlice<u16>,
    pub(super) ffn_norm: CudaSlice<f32>,
    /// `[w_gate; w_up]`, `2·hidden × dim`.
    pub(super) w_gate_up: CudaSlice<u16>,
    pub(super) w_down: CudaSlice<u16>,
}

/// A model's weights on the device.
pub(super) struct DeviceWeights {
    pub(super) embed: CudaSlice<u16>,
    pub(super) layers: Vec<LayerWeights>,
    pub(super) output_norm: CudaSlice<f32>,
    /// `None` when the unembedding is the embedding.
    pub(super) output: Option<CudaSlice<u16>>,
    pub(super) inv_freq: CudaSlice<f32>,
    /// Llama 3's per-frequency divisors, when the model has them.
    pub(super) freq_div: Option<CudaSlice<f32>>,
}

/// Dequantizes the rows of `matrices`, one after another, into f16 bits.
fn to_f16(matrices: &[&Matrix]) -> Vec<u16> {
    let cols = matrices.first().map_or(0, |m| m.cols);
    let rows: Vec<(&Matrix, usize)> = matrices
        .iter()
        .flat_map(|m| (0..m.rows).map(move |r| (*m, r)))
        .collect();
    let mut out = vec![0u16; rows.len() * cols];
    out.par_chunks_mut(cols.max(1))
        .zip(rows.par_iter())
        .for_each_init(
            || vec![0.0f32; cols],
            |row, (bits, (m, r))| {
                dequantize_row(m.ty, m.row(*r), row);
                for (b, &v) in bits.iter_mut().zip(row.iter()) {
                    *b = f16::from_f32(v).to_bits();
                }
            },
        );
    out
}

/// Uploads `model`'s weights.
pub(super) fn upload_weights(
    stream: &Arc<CudaStream>,
    model: &Llama,
) -> Result<DeviceWeights, CudaError> {
    let c = model.config();
    let layers = model
        .layers
        .iter()
        .map(|l| {
            Ok(LayerWeights {
                attn_norm: stream.clone_htod(&l.attn_norm)?,
                wqkv: stream.clone_htod(&to_f16(&[&l.wq, &l.wk, &l.wv]))?,
                wo: stream.clone_htod(&to_f16(&[&l.wo]))?,
                ffn_norm: stream.clone_htod(&l.ffn_norm)?,
                w_gate_up: stream.clone_htod(&to_f16(&[&l.w_gate, &l.w_up]))?,
                w_down: stream.clone_htod(&to_f16(&[&l.w_down]))?,
            })
        })
        .collect::<Result<Vec<_>, CudaError>>()?;
    let tied = std::ptr::eq(
        model.output.row(0).as_ptr(),
        model.token_embd.row(0).as_ptr(),
    );
    let inv_freq: Vec<f32> = (0..c.rope_dim / 2)
        .map(|i| c.rope_theta.powf(-2.0 * i as f32 / c.rope_dim as f32))
        .collect();
    Ok(DeviceWeights {
        embed: stream.clone_htod(&to_f16(&[&model.token_embd]))?,
        layers,
        output_norm: stream.clone_htod(&model.output_norm)?,
        output: if tied {
            None
        } else {
            Some(stream.clone_htod(&to_f16(&[&model.output]))?)
        },
        inv_freq: stream.clone_htod(&inv_freq)?,
        freq_div: match &model.rope_freq_factors {
            Some(f) => Some(stream.clone_htod(f)?),
            None => None,
        },
    })
}
