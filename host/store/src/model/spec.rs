//! A store as configuration names it: a URL, with the endpoint and region
//! optionally in its query, and the options to reach it.

use std::fmt;
use std::str::FromStr;

use crate::{StoreOptions, StoreUrl, UrlError};

/// A store URL plus how to reach it. Written as `s3://bucket/prefix`,
/// `s3://bucket/prefix?endpoint=http://127.0.0.1:8333&region=eu-west-1`, or
/// `file:///dir`. Credentials never go in the URL: they come from
/// [`StoreOptions`] or the `AWS_*` environment variables.
///
/// ```
/// use breakwater_store::model::StoreSpec;
/// let spec: StoreSpec = "s3://models/eu?endpoint=http://127.0.0.1:8333&region=eu-west-1".parse().unwrap();
/// assert_eq!(spec.url.to_string(), "s3://models/eu");
/// assert_eq!(spec.options.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
/// assert_eq!(spec.to_string(), "s3://models/eu?endpoint=http://127.0.0.1:8333");
/// ```
#[derive(Debug, Clone)]
pub struct StoreSpec {
    /// The store.
    pub url: StoreUrl,
    /// How to reach it.
    pub options: StoreOptions,
}

impl StoreSpec {
    /// `url` with `options`; an `endpoint=` or `region=` in the URL's query
    /// overrides the options' own.
    pub fn parse_with(text: &str, options: StoreOptions) -> Result<StoreSpec, UrlError> {
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        let mut options = options;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "endpoint" if !value.is_empty() => options.endpoint = Some(value.to_owned()),
                "region" if !value.is_empty() => options.region = Some(value.to_owned()),
                _ => {
                    return Err(UrlError {
                        url: text.to_owned(),
                        reason: format!(
                            "unknown or empty query parameter `{pair}`: only `endpoint=` and \
                             `region=` (credentials come from flags or AWS_* variables)"
                        ),
                    });
                }
            }
        }
        Ok(StoreSpec {
            url: base.parse()?,
            options,
        })
    }
}

impl FromStr for StoreSpec {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        StoreSpec::parse_with(text, StoreOptions::default())
    }
}

impl fmt::Display for StoreSpec {
    /// The URL and its endpoint: what messages name it by.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.url, &self.options.endpoint) {
            (StoreUrl::S3 { .. }, Some(endpoint)) => write!(f, "{}?endpoint={endpoint}", self.url),
            (url, _) => write!(f, "{url}"),
        }
    }
}
