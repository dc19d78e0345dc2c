//! KV cache blocks: which sequence holds which block, and the prefix cache.
//!
//! The pool is the scheduler's ledger; the [`Runner`](crate::backend::Runner)
//! holds the memory, `[layer][block][slot]` on every backend, and each
//! sequence reads and writes it through the block table this pool gave it.
//! A sequence reserves `ceil((prompt + max_tokens) / block_tokens)` blocks
//! when it is admitted, so it can never run out mid-generation and never
//! needs preempting. The reservation is conservative (a sequence that stops
//! early held blocks it did not fill); growing sequences block by block
//! would admit more of them at the price of preemption when the pool runs
//! dry.
//!
//! **Prefix cache.** A full block whose keys and values are computed is
//! entered in an index under the hash chain of its tokens: its own tokens
//! and the hash of the block before it, so a block stands for the whole
//! prefix up to its end. A new sequence walks its prompt's full blocks
//! through the index and takes every leading block found (its reference
//! count goes up) instead of computing it again. When the last sequence
//! using a cached block lets go, the block stays indexed but idle; idle
//! blocks are the first to be reused, least recently used first, once no
//! never-cached block is free. So the cache costs no capacity: it is the
//! free pool remembering what it held.
//!
//! The index lives in one engine, which serves one model version, so blocks
//! are never shared across versions. Hashes are keyed with a secret chosen
//! per pool (a client cannot craft two prompts whose chains collide), and a
//! hit is checked against the block's tokens and parent hash as well.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

/// A block's index in the runner's KV memory.
pub type BlockId = u32;

/// The chain hash before a sequence's first block.
const ROOT: u64 = 0;

/// What the index knows about a cached block.
#[derive(Debug)]
struct Cached {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
    /// When it last became idle; its key in [`BlockPool::idle`].
    idle_since: u64,
}

#[derive(Debug, Default)]
struct Block {
    /// Sequences holding it.
    refs: u32,
    cached: Option<Cached>,
}

/// A sequence's blocks, as [`BlockPool::allocate`] hands them out.
#[derive(Debug)]
pub struct Allocation {
    /// The block table: position `p` lives in block `table[p / block_tokens]`.
    pub table: Vec<BlockId>,
    /// Leading tokens whose keys and values the table's first blocks
    /// already hold: the sequence starts there.
    pub cached_tokens: usize,
    /// Where registering the sequence's own blocks picks up.
    pub chain: Chain,
}

/// How far a sequence's blocks are in the index: the first `blocks` of its
/// table, whose chain ends in `hash`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Chain {
    blocks: usize,
    hash: u64,
}

/// A fixed pool of KV blocks with a prefix index.
#[derive(Debug)]
pub struct BlockPool {
    block_tokens: usize,
    blocks: Vec<Block>,
    /// Unreferenced blocks holding nothing worth keeping.
    free: Vec<BlockId>,
    /// Unreferenced cached blocks, oldest first.
    idle: BTreeMap<u64, BlockId>,
    index: HashMap<u64, BlockId>,
    keys: RandomState,
    prefix_cache: bool,
    /// Blocks some sequence holds.
    used: usize,
    clock: u64,
    evictions: u64,
}

impl BlockPool {
    /// A pool of as many `block_tokens`-token blocks as fit in
    /// `budget_bytes` when a token takes `token_bytes` (keys and values of
    /// every layer, in the runner's layout); with `prefix_cache`, full
    /// blocks are shared between sequences that start alike.
    pub fn new(
        token_bytes: usize,
        block_tokens: usize,
        budget_bytes: usize,
        prefix_cache: bool,
    ) -> Self {
        let block_tokens = block_tokens.max(1);
        let total = budget_bytes / Self::block_bytes(token_bytes, block_tokens).max(1);
        // Ids are u32 on every backend (the CUDA kernels read i32 tables).
        let total = total.min(i32::MAX as usize);
        Self {
            block_tokens,
            blocks: (0..total).map(|_| Block::default()).collect(),
            // Popped from the back: block 0 first.
            free: (0..total as BlockId).rev().collect(),
            idle: BTreeMap::new(),
            index: HashMap::new(),
            keys: RandomState::new(),
            prefix_cache,
            used: 0,
            clock: 0,
            evictions: 0,
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
        self.total() * self.block_tokens
    }

    /// Whether full blocks are shared.
    pub fn prefix_cache(&self) -> bool {
        self.prefix_cache
    }

    /// Blocks for a sequence of `tokens` tokens (prompt plus what it may
    /// generate) that starts with `prompt`, reusing cached blocks for up to
    /// the first `reusable` tokens of `prompt`; `None`, taking nothing, when
    /// the pool cannot hold it now.
    pub fn allocate(
        &mut self,
        prompt: &[u32],
        reusable: usize,
        tokens: usize,
    ) -> Option<Allocation> {
        let need = self.blocks_for(tokens);
        let mut hits = Vec::new();
        let mut hash = ROOT;
        if self.prefix_cache {
            let reusable = reusable.min(prompt.len()).min(tokens);
            for chunk in prompt[..reusable].chunks_exact(self.block_tokens) {
                let h = self.chain_hash(hash, chunk);
                let Some(&id) = self.index.get(&h) else { break };
                let holds = self.blocks[id as usize]
                    .cached
                    .as_ref()
                    .is_some_and(|c| c.parent == hash && *c.tokens == *chunk);
                if !holds {
                    break;
                }
                hits.push(id);
                hash = h;
            }
        }
        let idle_hits = hits
            .iter()
            .filter(|&&id| self.blocks[id as usize].refs == 0)
            .count();
        let fresh = need - hits.len();
        if self.free.len() + self.idle.len() - idle_hits < fresh {
            return None;
        }
        let chain = Chain {
            blocks: hits.len(),
            hash,
        };
        let cached_tokens = hits.len() * self.block_tokens;
        let mut table = hits;
        for &id in &table {
            self.take(id);
        }
        for _ in 0..fresh {
            let id = match self.free.pop() {
                Some(id) => id,
                None => self.evict_oldest()?,
            };
            self.take(id);
            table.push(id);
        }
        Some(Allocation {
            table,
            cached_tokens,
            chain,
        })
    }

    /// Enters in the index the full blocks of `table` that the first
    /// `computed` of `tokens` (the sequence's tokens in order) now fill,
    /// from where `chain` stopped. A block whose prefix is already indexed
    /// (another sequence computed the same prefix at the same time) stays
    /// private and is simply freed at the end.
    pub fn register(
        &mut self,
        chain: &mut Chain,
        table: &[BlockId],
        tokens: &[u32],
        computed: usize,
    ) {
        if !self.prefix_cache {
            return;
        }
        let full = (computed.min(tokens.len()) / self.block_tokens).min(table.len());
        while chain.blocks < full {
            let at = chain.blocks * self.block_tokens;
            let chunk = &tokens[at..at + self.block_tokens];
            let hash = self.chain_hash(chain.hash, chunk);
            let id = table[chain.blocks];
            if !self.index.contains_key(&hash) && self.blocks[id as usize].cached.is_none() {
                self.index.insert(hash, id);
                self.blocks[id as usize].cached = Some(Cached {
                    hash,
                    parent: chain.hash,
                    tokens: chunk.into(),
                    idle_since: 0,
                });
            }
            chain.hash = hash;
            chain.blocks += 1;
        }
    }

    /// Lets go of a sequence's blocks. Cached ones stay in the index, idle;
    /// the table's last blocks become idle first, so a prefix's tail is
    /// evicted before its head, which more sequences share.
    pub fn release(&mut self, table: &[BlockId]) {
        for &id in table.iter().rev() {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.refs > 0, "releasing free block {id}");
            block.refs = block.refs.saturating_sub(1);
            if block.refs > 0 {
                continue;
            }
            self.used -= 1;
            match &mut block.cached {
                Some(cached) => {
                    self.clock += 1;
                    cached.idle_since = self.clock;
                    self.idle.insert(self.clock, id);
                }
                None => self.free.push(id),
            }
        }
    }

    fn take(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if block.refs == 0 {
            if let Some(cached) = &block.cached {
                self.idle.remove(&cached.idle_since);
            }
            self.used += 1;
        }
        block.refs += 1;
    }

    /// Drops the least recently used idle block from the index.
    fn evict_oldest(&mut self) -> Option<BlockId> {
        let (_, id) = self.idle.pop_first()?;
        if let Some(cached) = self.blocks[id as usize].cached.take() {
            self.index.remove(&cached.hash);
        }
        self.evictions += 1;
        Some(id)
    }

    fn chain_hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        let h = self.keys.hash_one((parent, tokens));
        // ROOT marks "no block before"; no block may hash to it.
        if h == ROOT { 1 } else { h }
    }

    /// Blocks some sequence holds.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Blocks a new sequence may take: the free ones and the idle cached
    /// ones.
    pub fn free(&self) -> usize {
        self.total() - self.used
    }

    /// Blocks in all.
    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks in the prefix index, held or idle.
    pub fn cached(&self) -> usize {
        self.index.len()
    }

    /// Cached blocks dropped from the index to make room, since the start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::BlockPool;

    fn pool(blocks: usize, prefix_cache: bool) -> BlockPool {
        // 512 bytes per token, blocks of 4 tokens.
        BlockPool::new(512, 4, blocks * 2048, prefix_cache)
    }

    #[test]
    fn reserves_whole_blocks_within_the_budget() {
        // 512 bytes per token, so 8 KiB per block of 16.
        assert_eq!(BlockPool::block_bytes(512, 16), 8192);
        let mut pool = BlockPool::new(512, 16, 10 * 8192 + 100, false);
        assert_eq!((pool.total(), pool.max_tokens()), (10, 160));
        assert_eq!(pool.blocks_for(17), 2);
        let a = pool.allocate(&[1; 100], 100, 7 * 16).expect("7 blocks");
        assert_eq!((a.table.len(), a.cached_tokens), (7, 0));
        assert!(pool.allocate(&[1], 0, 4 * 16).is_none());
        let b = pool.allocate(&[1], 0, 3 * 16).expect("3 blocks");
        pool.release(&a.table);
        assert_eq!((pool.used(), pool.free()), (3, 7));
        pool.release(&b.table);
        assert_eq!((pool.used(), pool.free(), pool.cached()), (0, 10, 0));
    }

    #[test]
    fn a_sequence_reuses_the_full_blocks_of_a_shared_prefix() {
        let mut pool = pool(16, true);
        let first: Vec<u32> = (0..10).collect();
        let mut a = pool.allocate(&first, first.len(), 12).expect("room");
        assert_eq!(a.cached_tokens, 0);
        // Computing 6 tokens fills one block; 10 fill two.
        pool.register(&mut a.chain, &a.table, &first, 6);
        assert_eq!(pool.cached(), 1);
        pool.register(&mut a.chain, &a.table, &first, 10);
        assert_eq!(pool.cached(), 2);

        // Same first 8 tokens, then different: two blocks shared while the
        // first sequence still runs.
        let second: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
        let b = pool.allocate(&second, second.len(), 16).expect("room");
        assert_eq!(b.cached_tokens, 8);
        assert_eq!(b.table[..2], a.table[..2]);
        assert_eq!(b.table.len(), 4);
        assert_eq!(pool.used(), 3 + 2);

        // A prompt that differs in its first block shares nothing.
        let other: Vec<u32> = [5].into_iter().chain(1..10).collect();
        let c = pool.allocate(&other, other.len(), 10).expect("room");
        assert_eq!(c.cached_tokens, 0);

        // Reuse stops where it is allowed to.
        let d = pool.allocate(&first, 7, 10).expect("room");
        assert_eq!(d.cached_tokens, 4);
        for t in [&a.table, &b.table, &c.table, &d.table] {
            pool.release(t);
        }
        assert_eq!((pool.used(), pool.free(), pool.cached()), (0, 16, 2));
    }

    #[test]
    fn idle_cached_blocks_survive_until_the_pool_needs_them_then_go_oldest_first() {
        let mut pool = pool(4, true);
        let old: Vec<u32> = (0..8).collect();
        let new: Vec<u32> = (100..108).collect();
        for prompt in [&old, &new] {
            let mut a = pool.allocate(prompt, 8, 8).expect("room");
            pool.register(&mut a.chain, &a.table, prompt, 8);
            pool.release(&a.table);
        }
        assert_eq!((pool.cached(), pool.free()), (4, 4));
        // Both prefixes still hit after their sequences ended.
        let hit = pool.allocate(&new, 8, 8).expect("room");
        assert_eq!(hit.cached_tokens, 8);
        pool.release(&hit.table);
        // A stranger needing one block evicts the least recently used one:
        // the old prefix's tail, not its head.
        let stranger: Vec<u32> = (200..208).collect();
        let s = pool.allocate(&stranger, 0, 4).expect("room");
        assert_eq!((pool.evictions(), pool.cached()), (1, 3));
        let head = pool.allocate(&old, 8, 8).expect("room");
        assert_eq!(head.cached_tokens, 4);
        pool.release(&head.table);
        pool.release(&s.table);
        // Old's second block took new's tail, the oldest idle block then.
        assert_eq!(pool.allocate(&new, 8, 8).map(|a| a.cached_tokens), Some(4));
    }

    #[test]
    fn a_prefix_computed_twice_at_once_is_indexed_once() {
        let mut pool = pool(8, true);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = pool.allocate(&prompt, 8, 8).expect("room");
        let mut b = pool.allocate(&prompt, 8, 8).expect("room");
        assert_eq!(b.cached_tokens, 0, "nothing computed yet");
        pool.register(&mut a.chain, &a.table, &prompt, 8);
        pool.register(&mut b.chain, &b.table, &prompt, 8);
        assert_eq!(pool.cached(), 2);
        pool.release(&b.table);
        pool.release(&a.table);
        // b's copies went back to the free list, a's stay cached.
        assert_eq!((pool.free(), pool.cached()), (8, 2));
    }

    #[test]
    fn without_the_prefix_cache_nothing_is_shared() {
        let mut pool = pool(8, false);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = pool.allocate(&prompt, 8, 8).expect("room");
        pool.register(&mut a.chain, &a.table, &prompt, 8);
        let b = pool.allocate(&prompt, 8, 8).expect("room");
        assert_eq!((b.cached_tokens, pool.cached(), pool.used()), (0, 0, 4));
    }
}
