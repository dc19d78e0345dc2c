//! KV cache accounting in fixed-size blocks under a memory budget.
//!
//! The pool is the scheduler's ledger; the [`Runner`](crate::backend::Runner)
//! holds the memory. The CPU runner keeps each sequence's cache contiguous,
//! sized to its reservation; the CUDA runner allocates exactly this many
//! blocks on the device and gives each sequence a block table. A sequence
//! reserves `ceil((prompt + max_tokens) / block_tokens)` blocks when it is
//! admitted, so it can never run out mid-generation and never needs
//! preempting. The reservation is conservative (a sequence that stops early
//! held blocks it did not fill); growing sequences block by block would
//! admit more of them at the price of preemption when the pool runs dry.

/// A fixed pool of KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    block_tokens: usize,
    total: usize,
    used: usize,
}

impl BlockPool {
    /// A pool of as many `block_tokens`-token blocks as fit in
    /// `budget_bytes` when a token takes `token_bytes` (keys and values of
    /// every layer, in the runner's layout).
    pub fn new(token_bytes: usize, block_tokens: usize, budget_bytes: usize) -> Self {
        let block_tokens = block_tokens.max(1);
        let total = budget_bytes / Self::block_bytes(token_bytes, block_tokens).max(1);
        Self {
            block_tokens,
            total,
            used: 0,
        }
    }

    /// Bytes one block of `block_tokens` tokens takes.
    pub fn block_bytes(token_bytes: usize, block_tokens: usize) -> usize {
        token_bytes.saturating_mul(block_tokens)
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
    use super::BlockPool;

    #[test]
    fn reserves_whole_blocks_within_the_budget() {
        // 2 layers × 32 kv dims × 2 × 4 bytes = 512 bytes per token, so
        // 8 KiB per block of 16.
        assert_eq!(BlockPool::block_bytes(512, 16), 8192);
        let mut pool = BlockPool::new(512, 16, 10 * 8192 + 100);
        assert_eq!((pool.total(), pool.max_tokens()), (10, 160));
        assert_eq!(pool.blocks_for(17), 2);
        assert!(pool.try_reserve(7));
        assert!(!pool.try_reserve(4));
        assert!(pool.try_reserve(3));
        pool.release(7);
        assert_eq!((pool.used(), pool.free()), (3, 7));
    }
}
