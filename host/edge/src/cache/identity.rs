//! Each client of a shared completion gets an answer of its own. An
//! OpenAI-style answer carries an `id`, unique per answer, and a `created`
//! time; clients tell answers apart by them (deduplication, logs, support
//! tickets). So a hit on a cached completion, or a waiter following a
//! leader's generation, gets the stored bytes with a fresh id and the
//! current time written over the leader's. The replacements have the same
//! length as what they replace, so `Content-Length` and the event framing
//! of a stream hold, and the content is the leader's, byte for byte.
//!
//! The leader's id and time are learned from the first chunk that names
//! them (an answer's first event, or the whole JSON body). One split
//! across two chunks is left as it was: the client then sees the
//! leader's id in that event, never a corrupt one.

use bytes::Bytes;

const ID_FIELD: &[u8] = b"\"id\":\"";
const CREATED_FIELD: &[u8] = b"\"created\":";

/// The rewriting for one client's copy of an answer.
pub(crate) struct Identity {
    now_secs: u64,
    learned: Option<Learned>,
}

/// What is replaced, with what: each pair of the same length.
struct Learned {
    id: (Vec<u8>, Vec<u8>),
    created: Option<(Vec<u8>, Vec<u8>)>,
}

impl Identity {
    pub(crate) fn new(now_secs: u64) -> Self {
        Self {
            now_secs,
            learned: None,
        }
    }

    /// `chunk` with this client's id and time in place of the leader's.
    pub(crate) fn rewrite(&mut self, chunk: Bytes) -> Bytes {
        if self.learned.is_none() {
            self.learned = learn(&chunk, self.now_secs);
        }
        let Some(learned) = &self.learned else {
            return chunk;
        };
        let mut out = replace_all(&chunk, &learned.id.0, &learned.id.1);
        if let Some((old, new)) = &learned.created {
            out = out.map_or_else(
                || replace_all(&chunk, old, new),
                |bytes| replace_all(&bytes, old, new).or(Some(bytes)),
            );
        }
        out.map_or(chunk, Bytes::from)
    }
}

/// The leader's `"id":"…"` and `"created":…` in `chunk`, with this
/// client's replacements; none when the chunk names no id.
fn learn(chunk: &[u8], now_secs: u64) -> Option<Learned> {
    let start = find(chunk, ID_FIELD)? + ID_FIELD.len();
    let len = chunk[start..].iter().position(|&b| b == b'"')?;
    let old_id = &chunk[start..start + len];
    if old_id.is_empty() || old_id.contains(&b'\\') {
        return None;
    }
    let mut id = ID_FIELD.to_vec();
    id.extend_from_slice(old_id);
    id.push(b'"');
    let mut fresh = ID_FIELD.to_vec();
    fresh.extend_from_slice(&fresh_id(old_id));
    fresh.push(b'"');

    let created = find(chunk, CREATED_FIELD).and_then(|at| {
        let digits_at = at + CREATED_FIELD.len();
        let digits = chunk[digits_at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let now = now_secs.to_string();
        // Another length would move every byte after it.
        (digits > 0 && now.len() == digits).then(|| {
            let old = chunk[at..digits_at + digits].to_vec();
            let mut new = CREATED_FIELD.to_vec();
            new.extend_from_slice(now.as_bytes());
            (old, new)
        })
    });
    Some(Learned {
        id: (id, fresh),
        created,
    })
}

/// An id like `old`: its prefix up to the last `-` kept (`chatcmpl-`,
/// `cmpl-`), the rest random hex of the same length.
fn fresh_id(old: &[u8]) -> Vec<u8> {
    let keep = old.iter().rposition(|&b| b == b'-').map_or(0, |i| i + 1);
    let mut id = old[..keep].to_vec();
    let mut hex = String::new();
    while hex.len() < old.len() - keep {
        hex.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    id.extend_from_slice(&hex.as_bytes()[..old.len() - keep]);
    id
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// `haystack` with every `old` replaced by `new` (of the same length);
/// none when there is no `old` in it.
fn replace_all(haystack: &[u8], old: &[u8], new: &[u8]) -> Option<Vec<u8>> {
    let mut at = find(haystack, old)?;
    let mut out = haystack.to_vec();
    loop {
        out[at..at + old.len()].copy_from_slice(new);
        match find(&out[at + old.len()..], old) {
            Some(next) => at += old.len() + next,
            None => return Some(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_gets_the_clients_id_and_time_and_keeps_its_length() {
        let first = Bytes::from_static(
            b"data: {\"id\":\"chatcmpl-0123456789abcdef0123456789abcdef\",\"object\":\"chat.completion.chunk\",\"created\":1796594860,\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        );
        let second = Bytes::from_static(
            b"data: {\"id\":\"chatcmpl-0123456789abcdef0123456789abcdef\",\"created\":1796594860,\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n",
        );
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        let mut identity = Identity::new(1_800_000_000);
        let out: Vec<Bytes> = [&first, &second, &done]
            .into_iter()
            .map(|chunk| identity.rewrite(chunk.clone()))
            .collect();
        for (before, after) in [&first, &second, &done].into_iter().zip(&out) {
            assert_eq!(before.len(), after.len());
        }
        let text = String::from_utf8_lossy(&out[0]);
        assert!(!text.contains("0123456789abcdef0123456789abcdef"), "{text}");
        assert!(text.contains("\"id\":\"chatcmpl-"), "{text}");
        assert!(text.contains("\"created\":1800000000"), "{text}");
        assert!(text.contains("\"content\":\"Hi\""), "{text}");
        // One id for the whole answer.
        let id = |chunk: &Bytes| {
            let text = String::from_utf8_lossy(chunk).into_owned();
            text.split('"').nth(3).map(str::to_owned)
        };
        assert_eq!(id(&out[0]), id(&out[1]));
        assert_eq!(out[2], done);
        // Another client, another id.
        let mut other = Identity::new(1_800_000_000);
        assert_ne!(id(&other.rewrite(first.clone())), id(&out[0]));
    }

    #[test]
    fn an_answer_without_an_id_or_with_a_time_of_another_length_is_kept() {
        let plain = Bytes::from_static(b"{\"object\":\"list\",\"data\":[]}");
        assert_eq!(Identity::new(1_800_000_000).rewrite(plain.clone()), plain);
        let old_time = Bytes::from_static(b"{\"id\":\"cmpl-abcdef0123456789\",\"created\":99}");
        let out = Identity::new(1_800_000_000).rewrite(old_time);
        let text = String::from_utf8_lossy(&out);
        assert!(text.ends_with("\"created\":99}"), "{text}");
        assert!(text.starts_with("{\"id\":\"cmpl-"), "{text}");
        assert!(!text.contains("abcdef0123456789"), "{text}");
    }
}
