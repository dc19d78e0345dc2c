//! UTC timestamps as manifests write them: `2026-11-27T09:28:00Z`.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, shown and parsed as RFC 3339 UTC with
/// whole seconds.
///
/// ```
/// use breakwater_store::model::Timestamp;
/// let t: Timestamp = "2026-11-27T09:28:00Z".parse().unwrap();
/// assert_eq!(t.to_string(), "2026-11-27T09:28:00Z");
/// assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// How long ago this was (zero if in the future).
    pub fn age(&self) -> Duration {
        let now = Timestamp::now().0;
        Duration::from_secs(u64::try_from(now - self.0).unwrap_or(0))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX)),
        }
    }
}

// Howard Hinnant's civil-from-days and days-from-civil.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = civil(self.0.div_euclid(86_400));
        let s = self.0.rem_euclid(86_400);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            s / 3600,
            s / 60 % 60,
            s % 60
        )
    }
}

impl FromStr for Timestamp {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not a UTC time like 2026-11-27T09:28:00Z");
        let b = text.as_bytes();
        if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
            return Err(bad());
        }
        let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
            text.get(range)
                .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)
        };
        if b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
            return Err(bad());
        }
        Ok(Timestamp(
            days(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + s,
        ))
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for t in [0, 951_782_400, 1_795_772_880, 4_102_444_799, -86_400] {
            let text = Timestamp(t).to_string();
            assert_eq!(text.parse::<Timestamp>(), Ok(Timestamp(t)), "{text}");
        }
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        for bad in [
            "",
            "2026-11-27 09:28:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27T09:28:00",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }
}
