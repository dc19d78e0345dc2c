//! Choosing between a file and its precompressed siblings (`file.br`,
//! `file.gz`) by `Accept-Encoding` (RFC 9110 §12.5.3).

/// A content-coding the node can serve from disk without compressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Encoding {
    Brotli,
    Gzip,
    Identity,
}

impl Encoding {
    /// Preference order at equal q-value: the smallest representation first.
    pub const PREFERENCE: [Encoding; 3] = [Encoding::Brotli, Encoding::Gzip, Encoding::Identity];

    /// The `Content-Encoding` value; `None` for identity.
    pub fn header_value(self) -> Option<&'static str> {
        match self {
            Encoding::Brotli => Some("br"),
            Encoding::Gzip => Some("gzip"),
            Encoding::Identity => None,
        }
    }

    /// Extension of the sibling file holding this coding.
    pub fn sibling_suffix(self) -> Option<&'static str> {
        match self {
            Encoding::Brotli => Some(".br"),
            Encoding::Gzip => Some(".gz"),
            Encoding::Identity => None,
        }
    }

    /// Appended to the ETag so that each variant has its own validator even
    /// if two siblings happened to share size and mtime.
    pub fn etag_suffix(self) -> &'static str {
        match self {
            Encoding::Brotli => "-br",
            Encoding::Gzip => "-gz",
            Encoding::Identity => "",
        }
    }
}

/// Picks the coding to serve. `available` lists the compressed siblings
/// that exist; identity always exists.
///
/// Without `Accept-Encoding` the client is served identity: RFC 9110 allows
/// any coding then, but a client that says nothing may not decode anything.
/// When the client refuses everything available (`identity;q=0` and no
/// acceptable sibling) identity is served anyway rather than a 406, as most
/// servers do: a body the client may not want beats no body.
pub(crate) fn negotiate(accept_encoding: Option<&str>, available: &[Encoding]) -> Encoding {
    let Some(header) = accept_encoding else {
        return Encoding::Identity;
    };
    let prefs = parse(header);
    let mut best = (Encoding::Identity, 0u16);
    // Iterate best-first so that a strictly greater q is needed to displace
    // an earlier (preferred) coding.
    for coding in Encoding::PREFERENCE {
        if coding != Encoding::Identity && !available.contains(&coding) {
            continue;
        }
        let q = quality(&prefs, coding);
        if q > best.1 {
            best = (coding, q);
        }
    }
    best.0
}

/// One `coding;q=…` entry, q in thousandths.
struct Pref {
    coding: String,
    q: u16,
}

fn parse(header: &str) -> Vec<Pref> {
    header
        .split(',')
        .filter_map(|item| {
            let mut params = item.split(';');
            let coding = params.next()?.trim().to_ascii_lowercase();
            if coding.is_empty() {
                return None;
            }
            let mut q = 1000;
            for param in params {
                let (name, value) = param.split_once('=')?;
                if name.trim().eq_ignore_ascii_case("q") {
                    // A malformed weight makes the whole entry unreadable;
                    // dropping it is safer than guessing.
                    q = parse_q(value.trim())?;
                }
            }
            Some(Pref { coding, q })
        })
        .collect()
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`.
fn parse_q(value: &str) -> Option<u16> {
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_thousandths = format!("{frac:0<3}").parse::<u16>().ok()?;
    match int {
        "0" => Some(frac_thousandths),
        "1" if frac_thousandths == 0 => Some(1000),
        _ => None,
    }
}

fn quality(prefs: &[Pref], coding: Encoding) -> u16 {
    let names: &[&str] = match coding {
        Encoding::Brotli => &["br"],
        // `x-gzip` is the historical alias RFC 9110 still asks us to accept.
        Encoding::Gzip => &["gzip", "x-gzip"],
        Encoding::Identity => &["identity"],
    };
    if let Some(p) = prefs.iter().find(|p| names.contains(&p.coding.as_str())) {
        return p.q;
    }
    if let Some(p) = prefs.iter().find(|p| p.coding == "*") {
        return p.q;
    }
    // Unlisted: identity stays acceptable (but below every listed coding at
    // q=1, which the strict `>` in `negotiate` and its order give us);
    // anything else was not asked for.
    match coding {
        Encoding::Identity => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::Encoding::*;
    use super::*;

    const BOTH: &[Encoding] = &[Brotli, Gzip];

    #[test]
    fn negotiation() {
        let cases: &[(Option<&str>, &[Encoding], Encoding)] = &[
            (None, BOTH, Identity),
            (Some(""), BOTH, Identity),
            (Some("gzip, deflate, br"), BOTH, Brotli),
            (Some("gzip, deflate, br"), &[Gzip], Gzip),
            (Some("gzip, deflate, br"), &[], Identity),
            (Some("br;q=0.5, gzip"), BOTH, Gzip),
            (Some("br;q=0.5, gzip;q=0.5"), BOTH, Brotli),
            (Some("GZIP"), BOTH, Gzip),
            (Some("x-gzip"), BOTH, Gzip),
            (Some("*"), BOTH, Brotli),
            (Some("*;q=0.1, identity"), BOTH, Identity),
            (Some("identity;q=0"), &[Gzip], Identity),
            (Some("identity;q=0, gzip"), &[Gzip], Gzip),
            (Some("br;q=0, gzip;q=0"), BOTH, Identity),
            (Some("br;q=0.9, identity;q=1"), BOTH, Identity),
            (Some("br;q=1.5"), BOTH, Identity),
            (Some("br;q=abc, gzip"), BOTH, Gzip),
            (Some("deflate"), BOTH, Identity),
        ];
        for (header, available, want) in cases {
            assert_eq!(
                negotiate(*header, available),
                *want,
                "{header:?} {available:?}"
            );
        }
    }

    #[test]
    fn qvalues() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.05"), Some(50));
        assert_eq!(parse_q("0"), Some(0));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.1234"), None);
        assert_eq!(parse_q("-1"), None);
    }
}
