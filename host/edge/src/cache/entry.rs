//! What the cache stores, and its byte form on disk and in the shared tier:
//! a magic, a CRC-32 of everything after it, then length-prefixed fields.
//! A record whose checksum or structure does not hold is corrupt and never
//! served. [`seal`] and [`unseal`] are that framing, for every tier.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Bumped with the record's layout: records of another layout read as
/// corrupt, so an upgrade starts with an empty disk tier.
const MAGIC: &[u8; 4] = b"BWC2";

/// One stored response.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as it is replayed, one frame per chunk: an event stream
    /// keeps one chunk per event.
    pub chunks: Vec<Bytes>,
    pub request_time_ms: u64,
    pub response_time_ms: u64,
    pub initial_age_ms: u64,
    pub freshness_ms: u64,
    /// Stale serving windows: the response's own, else the route's.
    pub swr_ms: u64,
    pub sie_ms: u64,
    /// Host and path with query, for purges by prefix.
    pub url: String,
    /// `Surrogate-Key` values, for purges by tag.
    pub tags: Vec<String>,
    /// A plugin's `cache-ttl-ms` set `freshness_ms`: the operator's policy
    /// then also overrides the upstream's `no-cache` (as it overrides its
    /// `max-age`), so hits need no round trip. An inference server marks
    /// every event stream `no-cache`, deterministic ones included.
    pub ttl_by_plugin: bool,
    /// A stored completion's token counts (prompt, completion), from its
    /// `usage`; what each hit saves a GPU. Zero for other answers.
    pub tokens: (u64, u64),
}

/// What lives under one storage key.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    /// Under the primary key: the `Vary` field names of the response last
    /// stored for it, to build the secondary key.
    Variants(Vec<String>),
    Response(std::sync::Arc<Entry>),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("bad magic")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("truncated or malformed record")]
    Malformed,
}

impl Entry {
    pub(crate) fn body_len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub(crate) fn current_age_ms(&self, now_ms: u64) -> u64 {
        self.initial_age_ms + now_ms.saturating_sub(self.response_time_ms)
    }

    /// How long either tier should keep it: as long as it can be of use,
    /// fresh, within a stale window, or revalidated by its validators.
    pub(crate) fn useful_for_ms(&self, now_ms: u64) -> u64 {
        let age = self.current_age_ms(now_ms);
        // A plugin's `cache-ttl-ms` may be anything up to u64::MAX.
        let mut until = self
            .freshness_ms
            .saturating_add(self.swr_ms.max(self.sie_ms));
        if self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
        {
            until = u64::MAX;
        }
        until.saturating_sub(age)
    }
}

impl Stored {
    /// Bytes the record takes in memory, roughly: what budgets count.
    pub(crate) fn weight(&self, key: &str) -> usize {
        let inner = match self {
            Stored::Variants(names) => names.iter().map(String::len).sum(),
            Stored::Response(entry) => {
                entry.body_len()
                    + entry
                        .headers
                        .iter()
                        .map(|(n, v)| n.as_str().len() + v.len() + 16)
                        .sum::<usize>()
                    + entry.url.len()
                    + entry.tags.iter().map(String::len).sum::<usize>()
                    + 128
            }
        };
        key.len() + inner + 64
    }

    /// The sealed record, as the disk tier keeps it.
    pub(crate) fn encode(&self) -> Vec<u8> {
        seal(MAGIC, &self.encode_body())
    }

    /// The fields alone, for a tier that seals them with more of its own.
    pub(crate) fn encode_body(&self) -> BytesMut {
        let mut body = BytesMut::new();
        match self {
            Stored::Variants(names) => {
                body.put_u8(0);
                put_list(&mut body, names.iter().map(String::as_bytes));
            }
            Stored::Response(e) => {
                body.put_u8(1);
                body.put_u16(e.status.as_u16());
                for n in [
                    e.request_time_ms,
                    e.response_time_ms,
                    e.initial_age_ms,
                    e.freshness_ms,
                    e.swr_ms,
                    e.sie_ms,
                ] {
                    body.put_u64(n);
                }
                put_bytes(&mut body, e.url.as_bytes());
                put_list(&mut body, e.tags.iter().map(String::as_bytes));
                body.put_u8(u8::from(e.ttl_by_plugin));
                body.put_u64(e.tokens.0);
                body.put_u64(e.tokens.1);
                body.put_u32(u32::try_from(e.headers.len()).unwrap_or(u32::MAX));
                for (name, value) in &e.headers {
                    put_bytes(&mut body, name.as_str().as_bytes());
                    put_bytes(&mut body, value.as_bytes());
                }
                put_list(&mut body, e.chunks.iter().map(|c| c.as_ref()));
            }
        }
        body
    }

    pub(crate) fn decode(record: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_body(unseal(MAGIC, record)?)
    }

    /// The fields [`Stored::encode_body`] wrote, already unsealed.
    pub(crate) fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(body);
        match r.u8()? {
            0 => Ok(Stored::Variants(r.strings()?)),
            1 => {
                let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Malformed)?;
                let mut times = [0u64; 6];
                for t in &mut times {
                    *t = r.u64()?;
                }
                let url = r.string()?;
                let tags = r.strings()?;
                let ttl_by_plugin = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed),
                };
                let tokens = (r.u64()?, r.u64()?);
                let count = r.u32()?;
                let mut headers = HeaderMap::new();
                for _ in 0..count {
                    let name =
                        HeaderName::from_bytes(&r.bytes()?).map_err(|_| DecodeError::Malformed)?;
                    let value = HeaderValue::from_maybe_shared(r.bytes()?)
                        .map_err(|_| DecodeError::Malformed)?;
                    headers.append(name, value);
                }
                let chunks = r.list()?;
                let [
                    request_time_ms,
                    response_time_ms,
                    initial_age_ms,
                    freshness_ms,
                    swr_ms,
                    sie_ms,
                ] = times;
                Ok(Stored::Response(std::sync::Arc::new(Entry {
                    status,
                    headers,
                    chunks,
                    request_time_ms,
                    response_time_ms,
                    initial_age_ms,
                    freshness_ms,
                    swr_ms,
                    sie_ms,
                    url,
                    tags,
                    ttl_by_plugin,
                    tokens,
                })))
            }
            _ => Err(DecodeError::Malformed),
        }
    }
}

/// `magic`, the CRC-32 of `body`, then `body`.
pub(crate) fn seal(magic: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(magic);
    out.extend_from_slice(&crc32fast::hash(body).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of a record [`seal`] made with `magic`, if it is intact.
pub(crate) fn unseal<'a>(magic: &[u8; 4], record: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    if record.len() < 8 || &record[..4] != magic {
        return Err(DecodeError::Magic);
    }
    let crc = u32::from_be_bytes([record[4], record[5], record[6], record[7]]);
    let body = &record[8..];
    if crc32fast::hash(body) != crc {
        return Err(DecodeError::Checksum);
    }
    Ok(body)
}

pub(crate) fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.put_slice(bytes);
}

fn put_list<'a>(out: &mut BytesMut, items: impl ExactSizeIterator<Item = &'a [u8]>) {
    out.put_u32(u32::try_from(items.len()).unwrap_or(u32::MAX));
    for item in items {
        put_bytes(out, item);
    }
}

/// Reads the fields [`put_bytes`] and [`put_list`] wrote, refusing to run
/// past the end.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.0.remaining() < n {
            Err(DecodeError::Malformed)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        let out = Bytes::copy_from_slice(&self.0[..len]);
        self.0.advance(len);
        Ok(out)
    }
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError::Malformed)
    }
    fn list(&mut self) -> Result<Vec<Bytes>, DecodeError> {
        let count = self.u32()? as usize;
        // Each item takes at least its 4-byte length: a count beyond that
        // is corruption, not a reason to allocate.
        self.need(count.saturating_mul(4))?;
        (0..count).map(|_| self.bytes()).collect()
    }
    fn strings(&mut self) -> Result<Vec<String>, DecodeError> {
        self.list()?
            .into_iter()
            .map(|b| String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stored {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Stored::Response(std::sync::Arc::new(Entry {
            status: StatusCode::OK,
            headers,
            chunks: vec![Bytes::from_static(b"hello "), Bytes::from_static(b"world")],
            request_time_ms: 1,
            response_time_ms: 2,
            initial_age_ms: 3,
            freshness_ms: 4,
            swr_ms: 5,
            sie_ms: 6,
            ttl_by_plugin: true,
            tokens: (7, 8),
            url: "example.com/a?b".into(),
            tags: vec!["t1".into(), "t2".into()],
        }))
    }

    #[test]
    fn round_trip() {
        let Stored::Response(back) = Stored::decode(&sample().encode()).unwrap() else {
            panic!("kind changed")
        };
        assert_eq!(back.chunks.len(), 2);
        assert_eq!(back.headers.get_all("x-multi").iter().count(), 2);
        assert_eq!(back.sie_ms, 6);
        assert_eq!(back.tags, ["t1", "t2"]);
        let Stored::Variants(names) =
            Stored::decode(&Stored::Variants(vec!["accept".into()]).encode()).unwrap()
        else {
            panic!("kind changed")
        };
        assert_eq!(names, ["accept"]);
    }

    #[test]
    fn a_plugin_ttl_of_u64_max_ms_keeps_the_entry_instead_of_overflowing() {
        let Stored::Response(entry) = sample() else {
            unreachable!("sample is a response")
        };
        let mut entry = (*entry).clone();
        entry.freshness_ms = u64::MAX;
        assert_eq!(entry.useful_for_ms(2), u64::MAX - entry.current_age_ms(2));
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let record = sample().encode();
        for i in 0..record.len() {
            let mut bad = record.clone();
            bad[i] ^= 0x40;
            assert!(Stored::decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
        assert!(Stored::decode(&record[..record.len() - 1]).is_err());
    }
}
