//! The `kv` capability: a `sled` tree per plugin, each value stored with
//! its expiry.

use crate::bindings::breakwater::plugin::kv::{Host, KvError};
use crate::host::HostState;
use crate::time::Clock;

/// One plugin's namespace in the node's key-value store.
#[derive(Debug, Clone)]
pub(crate) struct KvNamespace {
    tree: sled::Tree,
    max_key: usize,
    max_value: usize,
    clock: Clock,
}

/// Stored values are prefixed with their expiry, in milliseconds since the
/// Unix epoch, big-endian; 0 means never.
const EXPIRY_LEN: usize = 8;

fn storage(error: sled::Error) -> KvError {
    KvError::Storage(error.to_string())
}

fn limit(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl KvNamespace {
    pub(crate) fn open(
        db: &sled::Db,
        plugin: &str,
        max_key: usize,
        max_value: usize,
        clock: Clock,
    ) -> Result<Self, sled::Error> {
        Ok(KvNamespace {
            tree: db.open_tree(format!("plugin/{plugin}"))?,
            max_key,
            max_value,
            clock,
        })
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.len() > self.max_key {
            return Err(KvError::KeyTooLarge(limit(self.max_key)));
        }
        Ok(())
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_key(key)?;
        let Some(stored) = self.tree.get(key).map_err(storage)? else {
            return Ok(None);
        };
        let Some((expiry, value)) = stored.split_first_chunk::<EXPIRY_LEN>() else {
            // Not written by us: treat as absent rather than fail the plugin.
            return Ok(None);
        };
        let expiry = u64::from_be_bytes(*expiry);
        if expiry != 0 && expiry <= self.clock.unix_ms() {
            // Remove only if unchanged, so a concurrent fresh write survives.
            let _ = self
                .tree
                .compare_and_swap(key, Some(&stored), None::<&[u8]>)
                .map_err(storage)?;
            return Ok(None);
        }
        Ok(Some(value.to_vec()))
    }

    pub(crate) fn set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
        self.check_key(key)?;
        if value.len() > self.max_value {
            return Err(KvError::ValueTooLarge(limit(self.max_value)));
        }
        let expiry = ttl_ms.map_or(0, |ttl| self.clock.unix_ms().saturating_add(ttl.max(1)));
        let mut stored = Vec::with_capacity(EXPIRY_LEN + value.len());
        stored.extend_from_slice(&expiry.to_be_bytes());
        stored.extend_from_slice(value);
        self.tree.insert(key, stored).map_err(storage)?;
        Ok(())
    }

    pub(crate) fn delete(&self, key: &str) -> Result<(), KvError> {
        self.check_key(key)?;
        self.tree.remove(key).map_err(storage)?;
        Ok(())
    }
}

/// A plugin without the `kv` grant never links this interface, so reaching
/// here without a namespace is a host bug; answer with an error, not a
/// panic.
fn unavailable() -> KvError {
    KvError::Storage("the kv capability is not available to this plugin".to_owned())
}

impl Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, KvError> {
        self.plugin.kv.as_ref().ok_or_else(unavailable)?.get(&key)
    }

    fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        self.plugin
            .kv
            .as_ref()
            .ok_or_else(unavailable)?
            .set(&key, &value, ttl_ms)
    }

    fn delete(&mut self, key: String) -> Result<(), KvError> {
        self.plugin
            .kv
            .as_ref()
            .ok_or_else(unavailable)?
            .delete(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(db: &sled::Db, plugin: &str) -> KvNamespace {
        KvNamespace::open(db, plugin, 16, 8, Clock::system()).expect("open tree")
    }

    #[test]
    fn namespaces_are_separate_and_limits_hold() {
        let db = sled::Config::new().temporary(true).open().expect("open");
        let (a, b) = (namespace(&db, "a"), namespace(&db, "b"));
        a.set("k", b"v", None).expect("set");
        assert_eq!(a.get("k").expect("get"), Some(b"v".to_vec()));
        assert_eq!(b.get("k").expect("get"), None);
        assert!(matches!(
            a.set("k", b"123456789", None),
            Err(KvError::ValueTooLarge(8))
        ));
        assert!(matches!(
            a.get(&"k".repeat(17)),
            Err(KvError::KeyTooLarge(16))
        ));
        a.delete("k").expect("delete");
        assert_eq!(a.get("k").expect("get"), None);
    }
}
