//! Tiny random llama models in GGUF, deterministic from a seed, so that tests
//! exercise the whole path (file, tokenizer, template, forward pass) in
//! milliseconds without the demo model. [`hf`] writes random models as
//! Hugging Face directories, up to SmolLM2-135M's shape.
//!
//! ```
//! # use breakwater_infer::{gguf::Gguf, model::llama::Llama, test_model};
//! let gguf = Gguf::from_bytes(test_model::tiny_llama(7)).unwrap();
//! let model = Llama::from_gguf(&gguf).unwrap();
//! assert_eq!(model.config().n_kv_heads, 2);
//! ```

pub mod hf;

use crate::gguf::Value;
use crate::gguf::writer::GgufWriter;
use crate::quant::{GgmlType, quantize_row};

/// The chat template tiny models carry (ChatML, as SmolLM2's).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The merges of [`tiny_llama`]'s vocabulary (and of [`hf`]'s models).
pub const TINY_MERGES: [&str; 5] = ["h e", "l l", "he ll", "Ġ w", "o r"];

/// Control tokens, at ids 0, 1 and 2 as in SmolLM2.
pub const CONTROL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-level alphabet: the printable character standing for each
/// byte, in byte order.
pub fn byte_alphabet() -> Vec<char> {
    let mut shifted = 0u32;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let code = if printable {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            // Both ranges are valid scalar values (at most U+0143).
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

/// Writes tokenizer metadata for a byte-level BPE vocabulary: the control
/// tokens, every byte, then one token per merge.
pub fn write_tokenizer(w: &mut GgufWriter, merges: &[&str]) {
    let mut tokens: Vec<String> = CONTROL_TOKENS.iter().map(|t| t.to_string()).collect();
    let mut types = vec![3i32; CONTROL_TOKENS.len()];
    tokens.extend(byte_alphabet().iter().map(char::to_string));
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    types.resize(tokens.len(), 1);
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    w.metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", Value::String("smollm".into()))
        .metadata("tokenizer.ggml.tokens", strings(tokens))
        .metadata(
            "tokenizer.ggml.merges",
            strings(merges.iter().map(|m| m.to_string()).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(1))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(2))
        .metadata(
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        );
}

/// A tiny llama GGUF (2 layers, width 64, 4 query and 2 kv heads, a 263
/// token byte-level vocabulary), weights quantized as in the demo model:
/// Q4_1 matrices, Q8_0 tied embeddings, f32 norms.
pub fn tiny_llama(seed: u64) -> Vec<u8> {
    const MERGES: [&str; 5] = TINY_MERGES;
    let (dim, hidden, layers, heads, kv_heads) = (64u64, 128u64, 2, 4u32, 2u32);
    let vocab = (CONTROL_TOKENS.len() + 256 + MERGES.len()) as u64;
    let mut w = GgufWriter::default();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.context_length", Value::U32(256))
        .metadata("llama.embedding_length", Value::U32(dim as u32))
        .metadata("llama.block_count", Value::U32(layers))
        .metadata("llama.feed_forward_length", Value::U32(hidden as u32))
        .metadata("llama.attention.head_count", Value::U32(heads))
        .metadata("llama.attention.head_count_kv", Value::U32(kv_heads))
        .metadata("llama.rope.freq_base", Value::F32(10_000.0))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    write_tokenizer(&mut w, &MERGES);

    let mut rand = Noise(seed);
    let mut matrix = |w: &mut GgufWriter, name: &str, cols: u64, rows: u64, ty: GgmlType| {
        let scale = 1.0 / (cols as f32).sqrt();
        let values: Vec<f32> = (0..cols * rows).map(|_| rand.next() * scale).collect();
        w.tensor(name, &[cols, rows], ty, quantize_row(ty, &values));
    };
    let kv_dim = dim / u64::from(heads) * u64::from(kv_heads);
    matrix(&mut w, "token_embd.weight", dim, vocab, GgmlType::Q8_0);
    let norm = |w: &mut GgufWriter, name: &str| {
        w.tensor(
            name,
            &[dim],
            GgmlType::F32,
            quantize_row(GgmlType::F32, &vec![1.0; dim as usize]),
        );
    };
    for l in 0..layers {
        let q4 = GgmlType::Q4_1;
        norm(&mut w, &format!("blk.{l}.attn_norm.weight"));
        matrix(&mut w, &format!("blk.{l}.attn_q.weight"), dim, dim, q4);
        matrix(&mut w, &format!("blk.{l}.attn_k.weight"), dim, kv_dim, q4);
        matrix(&mut w, &format!("blk.{l}.attn_v.weight"), dim, kv_dim, q4);
        matrix(&mut w, &format!("blk.{l}.attn_output.weight"), dim, dim, q4);
        norm(&mut w, &format!("blk.{l}.ffn_norm.weight"));
        matrix(&mut w, &format!("blk.{l}.ffn_gate.weight"), dim, hidden, q4);
        matrix(&mut w, &format!("blk.{l}.ffn_up.weight"), dim, hidden, q4);
        matrix(&mut w, &format!("blk.{l}.ffn_down.weight"), hidden, dim, q4);
    }
    norm(&mut w, "output_norm.weight");
    w.finish()
}

/// A small deterministic generator (PCG-style LCG), uniform in [-1, 1).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
