//! KV cache accounting in fixed-size blocks under a memory budget.
//!
//! The model's [`State`](crate::model::llama::State) keeps each sequence's
//! cache contiguous, so blocks here are an accounting unit, not pages: a
//! sequence reserves `ceil((prompt + max_tokens) / block_tokens)` blocks when
//! it is admitted and its state is sized to exactly that, so it can never run
//! out mid-generation and never needs preempting. The reservation is
//! conservative (a sequence that stops early held blocks it did not fill);
//! paged attention, which grows a sequence block by block, would admit more
//! sequences and belongs with the CUDA backend's cache layout.

use crate::model::llama::LlamaConfig;

/// A fixed pool of KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    block_tokens: usize,
    total: usize,
    used: usize,
}

impl BlockPool {
    /// A pool of as many `block_tokens`-token blocks of `config`'s cache as
    /// fit in `budget_bytes`.
    pub fn new(config: &LlamaConfig, block_tokens: usize, budget_bytes: usize) -> Self {
        let block_tokens = block_tokens.max(1);
        let total = budget_bytes / Self::block_bytes(config, block_tokens).max(1);
        Self {
            block_tokens,
            total,
            used: 0,
        }
    }

    /// Bytes one block of `block_tokens` tokens takes: keys and values, f32,
    /// for every layer.
    pub fn block_bytes(config: &LlamaConfig, block_tokens: usize) -> usize {
        2 * config.n_layers * config.kv_dim() * std::mem::size_of::<f32>() * block_tokens
    }

    /// Blocks a sequence of `tokens` tokens needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The longest sequence the whole pool could hold.
    pub fn max_tokens(&self) -> usize {
        self.total * self.block_tokens
    }

    /// Takes `n` blocks if that many are free.
    pub fn try_reserve(&mut self, n: usize) -> bool {
        if n <= self.free() {
            self.used += n;
            true
        } else {
            false
        }
    }

    /// Returns `n` blocks.
    pub fn release(&mut self, n: usize) {
        debug_assert!(n <= self.used, "releasing {n} of {} blocks", self.used);
        self.used = self.used.saturating_sub(n);
    }

    /// Blocks in use.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Blocks free.
    pub fn free(&self) -> usize {
        self.total - self.used
    }

    /// Blocks in all.
    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_whole_blocks_within_the_budget() {
        let config = LlamaConfig {
            dim: 64,
            hidden_dim: 128,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            vocab_size: 100,
            context_length: 256,
            rope_theta: 1e4,
            rope_dim: 16,
            rope_position_scale: 1.0,
            rms_eps: 1e-5,
        };
        // 2 layers × 32 kv dims × 2 × 4 bytes × 16 tokens = 8 KiB per block.
        assert_eq!(BlockPool::block_bytes(&config, 16), 8192);
        let mut pool = BlockPool::new(&config, 16, 10 * 8192 + 100);
        assert_eq!((pool.total(), pool.max_tokens()), (10, 160));
        assert_eq!(pool.blocks_for(17), 2);
        assert!(pool.try_reserve(7));
        assert!(!pool.try_reserve(4));
        assert!(pool.try_reserve(3));
        pool.release(7);
        assert_eq!((pool.used(), pool.free()), (3, 7));
    }
}
