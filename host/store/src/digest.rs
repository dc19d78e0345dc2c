//! sha256 pins: parsing them as configuration writes them, and hashing
//! files and streams.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A sha256 digest, as pins are written: 64 hex digits, optionally after
/// `sha256:`, in either case, surrounding whitespace ignored. It displays as
/// 64 lower-case hex digits.
///
/// ```
/// use breakwater_store::Sha256Digest;
/// let pin: Sha256Digest = "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
///     .parse()
///     .unwrap();
/// assert_eq!(pin, Sha256Digest::of(b""));
/// assert!("e3b0".parse::<Sha256Digest>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);

/// Why a pin is not a sha256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a sha256 digest: {reason}")]
pub struct DigestParseError {
    /// The text as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The digest of the file at `path`, read in 1 MiB blocks.
    pub fn of_file(path: &Path) -> io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Self(hasher.finalize().into()))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| DigestParseError {
            value: text.to_owned(),
            reason,
        };
        let trimmed = text.trim();
        let hex = trimmed
            .strip_prefix("sha256:")
            .unwrap_or(trimmed)
            .as_bytes();
        if hex.len() != 64 {
            return Err(error("it must be 64 hex digits"));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let (Some(high), Some(low)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                return Err(error("it may hold only the hex digits 0-9 and a-f"));
            };
            *byte = high << 4 | low;
        }
        Ok(Self(bytes))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_malformed_pins() {
        let digest = Sha256Digest::of(b"breakwater");
        let text = digest.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Sha256Digest>(), Ok(digest));
        assert_eq!(format!(" sha256:{text}\n").parse(), Ok(digest));
        assert!("".parse::<Sha256Digest>().is_err());
        assert!(format!("{text}0").parse::<Sha256Digest>().is_err());
        let not_hex = format!("{}g", &text[..63]);
        assert_eq!(
            not_hex.parse::<Sha256Digest>().map_err(|e| e.reason),
            Err("it may hold only the hex digits 0-9 and a-f")
        );
    }
}
