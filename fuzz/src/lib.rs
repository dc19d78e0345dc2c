//! What the fuzz targets share: inputs made of several files or fields are
//! one byte string cut at [`SEPARATOR`], so that seeds stay readable and
//! `seeds.py` can write them.

/// Between the sections of one input.
pub const SEPARATOR: &[u8] = b"\n--8<--\n";

/// `data` cut at each [`SEPARATOR`].
pub fn sections(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}
