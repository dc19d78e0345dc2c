//! The request file of `breakwater plugin test`: cases, the requests they
//! describe, what each expects, and the decision a plugin made, as JSON.
//!
//! Expectations use the same field names as the printed decisions, so a
//! printed line, trimmed, is a valid `expect`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use breakwater_sandbox::{
    CallError, FailureKind, Request, RequestChanges, RequestDecision, Response, ResponseDecision,
    http_view,
};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One request to run, with what it should produce.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Case {
    /// A label for reports.
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default = "default_method")]
    pub(crate) method: String,
    /// Path and query.
    #[serde(default = "default_path")]
    pub(crate) path: String,
    #[serde(default = "default_host")]
    pub(crate) host: String,
    #[serde(default)]
    pub(crate) headers: Headers,
    #[serde(default = "default_client_ip")]
    pub(crate) client_ip: String,
    /// Default: `test-<case number>`.
    #[serde(default)]
    pub(crate) request_id: Option<String>,
    #[serde(default)]
    pub(crate) body: Option<Body>,
    /// The route buffers this many bytes for plugins and the body was
    /// larger: the plugin sees no body and the too-large mark instead.
    #[serde(default)]
    pub(crate) body_too_large: Option<u64>,
    /// The upstream's response head; when present, `on-response` runs too.
    #[serde(default)]
    pub(crate) response: Option<ResponseInput>,
    #[serde(default)]
    pub(crate) expect: Option<Expect>,
}

fn default_method() -> String {
    "GET".to_owned()
}

fn default_path() -> String {
    "/".to_owned()
}

fn default_host() -> String {
    "localhost".to_owned()
}

/// An address from TEST-NET-1 (RFC 5737), which no real client has.
fn default_client_ip() -> String {
    "192.0.2.1".to_owned()
}

impl Case {
    /// What is wrong with this case that JSON's shape cannot say.
    pub(crate) fn problem(&self) -> Option<String> {
        if let Err(problem) = self.request(0) {
            return Some(problem);
        }
        if self.body.is_some() && self.body_too_large.is_some() {
            return Some(
                "give `body` or `body_too_large`, not both: a body too large is never shown"
                    .to_owned(),
            );
        }
        if let Some(response) = &self.response
            && !(100..=999).contains(&response.status)
        {
            return Some(format!(
                "`response.status` {} is not an HTTP status",
                response.status
            ));
        }
        None
    }

    /// The request as the node would hold it: method upper-case, `host` as
    /// its Host header, the headers as HTTP fields.
    pub(crate) fn request(&self, number: usize) -> Result<CaseRequest, String> {
        let method = http::Method::from_bytes(self.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("`method` {:?} is not an HTTP method", self.method))?;
        if !self.path.starts_with('/') {
            return Err(format!("`path` {:?} must start with `/`", self.path));
        }
        let uri: http::Uri = self
            .path
            .parse()
            .map_err(|e| format!("`path` {:?} is not a valid path and query: {e}", self.path))?;
        let mut request = http::Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        let host = http::HeaderValue::from_str(&self.host)
            .map_err(|_| format!("`host` {:?} is not a valid Host header", self.host))?;
        headers.insert(http::header::HOST, host);
        for (name, value) in &self.headers.0 {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header name {name:?} is not an HTTP field name"))?;
            if name == http::header::HOST {
                return Err("give the host as `host`, not as a header".to_owned());
            }
            let value = http::HeaderValue::from_bytes(value.as_bytes())
                .map_err(|_| format!("the value of header `{name}` is not an HTTP field value"))?;
            headers.append(name, value);
        }
        let client_ip = self
            .client_ip
            .parse()
            .map_err(|_| format!("`client_ip` {:?} is not an IP address", self.client_ip))?;
        Ok(CaseRequest {
            parts: request.into_parts().0,
            client_ip,
            request_id: self
                .request_id
                .clone()
                .unwrap_or_else(|| format!("test-{number}")),
            body: self.body.as_ref().map(|b| b.0.clone()),
            body_too_large: self.body_too_large,
        })
    }
}

/// A case's request, held as the node holds one, so that the node's own
/// code shows it to a plugin and applies the plugin's changes to it.
pub(crate) struct CaseRequest {
    parts: http::request::Parts,
    client_ip: IpAddr,
    request_id: String,
    body: Option<Vec<u8>>,
    body_too_large: Option<u64>,
}

impl CaseRequest {
    /// What a plugin is handed.
    pub(crate) fn view(&self) -> Request {
        let mut view = http_view::request_view(&self.parts, self.client_ip, &self.request_id);
        view.body.clone_from(&self.body);
        if let Some(limit) = self.body_too_large {
            http_view::mark_body_too_large(&mut view, limit);
        }
        view
    }

    /// A `continue-with`'s header edits and path rewrite, as the node
    /// applies them.
    pub(crate) fn apply(&mut self, changes: &RequestChanges) {
        http_view::apply_request_changes(&mut self.parts, changes);
    }
}

/// Header fields, written as an object (`{"accept": "text/html"}`, a list
/// of values repeating the header) or as `[name, value]` pairs. Names are
/// lower-cased, as the node does.
#[derive(Default, Clone)]
pub(crate) struct Headers(pub(crate) Vec<(String, String)>);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;
        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = Headers;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "headers as an object of name: value (a list of values repeats the header) \
                     or a list of [name, value] pairs",
                )
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut headers = Vec::new();
                while let Some((name, values)) = map.next_entry::<String, Values>()? {
                    let name = name.to_ascii_lowercase();
                    headers.extend(values.0.into_iter().map(|v| (name.clone(), v)));
                }
                Ok(Headers(headers))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Headers, A::Error> {
                let mut headers = Vec::new();
                while let Some((name, Text(value))) = seq.next_element::<(String, Text)>()? {
                    headers.push((name.to_ascii_lowercase(), value));
                }
                Ok(Headers(headers))
            }
        }
        deserializer.deserialize_any(HeadersVisitor)
    }
}

/// A header value: a string, or a number written without quotes
/// (`"content-length": 12`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Text(pub(crate) String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value (a string or a number)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// One header value or a list of them.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Values(pub(crate) Vec<String>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValuesVisitor;
        impl<'de> Visitor<'de> for ValuesVisitor {
            type Value = Values;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value (a string or a number) or a list of them")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Values, E> {
                Ok(Values(vec![v.to_owned()]))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Values, E> {
                Ok(Values(vec![v.to_string()]))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Values, E> {
                Ok(Values(vec![v.to_string()]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
                let mut values = Vec::new();
                while let Some(Text(value)) = seq.next_element()? {
                    values.push(value);
                }
                Ok(Values(values))
            }
        }
        deserializer.deserialize_any(ValuesVisitor)
    }
}

/// A request body: a string as its UTF-8 bytes, or any other JSON value
/// (an object, say) as its compact JSON text, which saves escaping a JSON
/// body inside a JSON string.
pub(crate) struct Body(pub(crate) Vec<u8>);

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(text) => Ok(Body(text.into_bytes())),
            other => serde_json::to_vec(&other)
                .map(Body)
                .map_err(de::Error::custom),
        }
    }
}

/// The upstream response head `on-response` sees.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResponseInput {
    #[serde(default = "default_status")]
    pub(crate) status: u16,
    #[serde(default)]
    pub(crate) headers: Headers,
}

fn default_status() -> u16 {
    200
}

/// The kinds of decision, as printed and expected.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum DecisionKind {
    Continue,
    ContinueWith,
    Respond,
    /// The call failed: a trap, the deadline, the memory cap, …
    Failed,
}

impl DecisionKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            DecisionKind::Continue => "continue",
            DecisionKind::ContinueWith => "continue-with",
            DecisionKind::Respond => "respond",
            DecisionKind::Failed => "failed",
        }
    }
}

/// Expected header values by name: a value, a list for a repeated header,
/// or `null` for "not there".
type HeaderExpectations = BTreeMap<String, Option<Values>>;

/// What the `on-request` decision should be; every field is optional and
/// only the fields given are checked. `on_response` holds the same for
/// `on-response`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Expect {
    decision: Option<DecisionKind>,
    failure: Option<FailureKind>,
    status: Option<u16>,
    /// A `respond` decision's headers.
    #[serde(default)]
    headers: HeaderExpectations,
    body: Option<String>,
    body_contains: Option<String>,
    /// Fields the body, as JSON, must have: objects may hold more keys.
    body_json: Option<Value>,
    /// A `continue-with` decision's headers to set.
    #[serde(default)]
    set_headers: HeaderExpectations,
    /// Names that must be among those removed.
    #[serde(default)]
    remove_headers: Vec<String>,
    #[serde(default, deserialize_with = "given")]
    rewrite_path: Option<Option<String>>,
    #[serde(default, deserialize_with = "given")]
    upstream_pool: Option<Option<String>>,
    #[serde(default, deserialize_with = "given")]
    cache_key: Option<Option<String>>,
    #[serde(default, deserialize_with = "given")]
    cache_ttl_ms: Option<Option<u64>>,
    cache_bypass: Option<bool>,
    on_response: Option<ResponseExpect>,
}

/// What the `on-response` decision should be: [`Expect`] without the
/// fields only a request decision has.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResponseExpect {
    decision: Option<DecisionKind>,
    failure: Option<FailureKind>,
    status: Option<u16>,
    #[serde(default)]
    headers: HeaderExpectations,
    body: Option<String>,
    body_contains: Option<String>,
    body_json: Option<Value>,
    #[serde(default)]
    set_headers: HeaderExpectations,
    #[serde(default)]
    remove_headers: Vec<String>,
    #[serde(default, deserialize_with = "given")]
    cache_ttl_ms: Option<Option<u64>>,
    cache_bypass: Option<bool>,
}

/// Tells `"field": null` (expect it unset) from a missing field (don't
/// check it): the outer `Some` says the field was written.
fn given<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl Expect {
    /// Whether the case says anything about `on-response`.
    pub(crate) fn on_response(&self) -> Option<&ResponseExpect> {
        self.on_response.as_ref()
    }

    /// The mismatches between this and what `on-request` decided.
    pub(crate) fn mismatches(&self, outcome: &Outcome) -> Vec<String> {
        let mut checks = Checks::new(outcome);
        checks.common(
            self.decision,
            self.failure,
            self.status,
            &self.headers,
            self.body.as_deref(),
            self.body_contains.as_deref(),
            self.body_json.as_ref(),
            &self.set_headers,
            &self.remove_headers,
        );
        checks.option("rewrite_path", &self.rewrite_path, &outcome.rewrite_path);
        checks.option("upstream_pool", &self.upstream_pool, &outcome.upstream_pool);
        checks.option("cache_key", &self.cache_key, &outcome.cache_key);
        checks.option("cache_ttl_ms", &self.cache_ttl_ms, &outcome.cache_ttl_ms);
        checks.bypass(self.cache_bypass);
        checks.found
    }
}

impl ResponseExpect {
    /// The mismatches between this and what `on-response` decided.
    pub(crate) fn mismatches(&self, outcome: &Outcome) -> Vec<String> {
        let mut checks = Checks::new(outcome);
        checks.common(
            self.decision,
            self.failure,
            self.status,
            &self.headers,
            self.body.as_deref(),
            self.body_contains.as_deref(),
            self.body_json.as_ref(),
            &self.set_headers,
            &self.remove_headers,
        );
        checks.option("cache_ttl_ms", &self.cache_ttl_ms, &outcome.cache_ttl_ms);
        checks.bypass(self.cache_bypass);
        checks.found
    }
}

/// A decision of either phase, or the call's failure, flattened: the
/// fields a decision kind lacks are empty.
#[derive(Serialize, Default)]
pub(crate) struct Outcome {
    #[serde(serialize_with = "kind_name")]
    pub(crate) decision: Option<DecisionKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failure: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<u16>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "header_object"
    )]
    pub(crate) headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "body_text")]
    pub(crate) body: Option<Vec<u8>>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "header_object"
    )]
    pub(crate) set_headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) remove_headers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rewrite_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream_pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache_ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) cache_bypass: bool,
}

fn kind_name<S: serde::Serializer>(
    kind: &Option<DecisionKind>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(kind.map_or("continue", DecisionKind::name))
}

/// Headers as an object, as written in `expect`: a repeated header's
/// values become a list.
fn header_object<S: serde::Serializer>(
    headers: &[(String, String)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut object = Map::new();
    for (name, value) in headers {
        match object.get_mut(name) {
            None => {
                object.insert(name.clone(), Value::String(value.clone()));
            }
            Some(Value::Array(values)) => values.push(Value::String(value.clone())),
            Some(first) => {
                let first = first.take();
                object.insert(
                    name.clone(),
                    Value::Array(vec![first, Value::String(value.clone())]),
                );
            }
        }
    }
    object.serialize(serializer)
}

/// A body as text when it is UTF-8, else as `hex:` and its bytes.
fn body_text<S: serde::Serializer>(
    body: &Option<Vec<u8>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match body.as_deref().map(std::str::from_utf8) {
        None => serializer.serialize_none(),
        Some(Ok(text)) => serializer.serialize_str(text),
        Some(Err(_)) => {
            let bytes = body.as_deref().unwrap_or_default();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            serializer.serialize_str(&format!("hex:{hex}"))
        }
    }
}

impl Outcome {
    pub(crate) fn kind(&self) -> DecisionKind {
        self.decision.unwrap_or(DecisionKind::Continue)
    }

    pub(crate) fn failed(error: &CallError) -> Outcome {
        Outcome {
            decision: Some(DecisionKind::Failed),
            failure: Some(error.kind.label()),
            message: Some(error.message.clone()),
            ..Outcome::default()
        }
    }

    fn respond(response: Response) -> Outcome {
        Outcome {
            decision: Some(DecisionKind::Respond),
            status: Some(response.status),
            headers: response.headers,
            body: Some(response.body),
            ..Outcome::default()
        }
    }

    pub(crate) fn of_request(decision: RequestDecision) -> Outcome {
        match decision {
            RequestDecision::Continue => Outcome::default(),
            RequestDecision::Respond(response) => Outcome::respond(response),
            RequestDecision::ContinueWith(changes) => Outcome {
                decision: Some(DecisionKind::ContinueWith),
                set_headers: changes.set_headers,
                remove_headers: changes.remove_headers,
                rewrite_path: changes.rewrite_path,
                upstream_pool: changes.upstream_pool,
                cache_key: changes.cache_key,
                cache_ttl_ms: changes.cache_ttl_ms,
                cache_bypass: changes.cache_bypass,
                ..Outcome::default()
            },
        }
    }

    pub(crate) fn of_response(decision: ResponseDecision) -> Outcome {
        match decision {
            ResponseDecision::Continue => Outcome::default(),
            ResponseDecision::Respond(response) => Outcome::respond(response),
            ResponseDecision::ContinueWith(changes) => Outcome {
                decision: Some(DecisionKind::ContinueWith),
                set_headers: changes.set_headers,
                remove_headers: changes.remove_headers,
                cache_ttl_ms: changes.cache_ttl_ms,
                cache_bypass: changes.cache_bypass,
                ..Outcome::default()
            },
        }
    }
}

/// Collects the mismatches of one phase.
struct Checks<'o> {
    outcome: &'o Outcome,
    found: Vec<String>,
}

impl<'o> Checks<'o> {
    fn new(outcome: &'o Outcome) -> Self {
        Checks {
            outcome,
            found: Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)] // one per field both phases share
    fn common(
        &mut self,
        decision: Option<DecisionKind>,
        failure: Option<FailureKind>,
        status: Option<u16>,
        headers: &HeaderExpectations,
        body: Option<&str>,
        body_contains: Option<&str>,
        body_json: Option<&Value>,
        set_headers: &HeaderExpectations,
        remove_headers: &[String],
    ) {
        let outcome = self.outcome;
        if let Some(expected) = decision
            && expected != outcome.kind()
        {
            self.found.push(format!(
                "decision: expected {}, got {}",
                expected.name(),
                outcome.kind().name()
            ));
        }
        if let Some(expected) = failure
            && outcome.failure != Some(expected.label())
        {
            self.found.push(format!(
                "failure: expected {}, got {}",
                expected.label(),
                outcome.failure.unwrap_or("none")
            ));
        }
        if let Some(expected) = status
            && outcome.status != Some(expected)
        {
            self.found.push(format!(
                "status: expected {expected}, got {}",
                outcome
                    .status
                    .map_or_else(|| "none".to_owned(), |s| s.to_string())
            ));
        }
        self.headers("headers", headers, &outcome.headers);
        self.headers("set_headers", set_headers, &outcome.set_headers);
        for name in remove_headers {
            if !outcome
                .remove_headers
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name))
            {
                self.found.push(format!(
                    "remove_headers: expected {name:?} among {:?}",
                    outcome.remove_headers
                ));
            }
        }
        self.body(body, body_contains, body_json);
    }

    fn headers(&mut self, field: &str, expected: &HeaderExpectations, actual: &[(String, String)]) {
        for (name, want) in expected {
            let got: Vec<&str> = actual
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
                .collect();
            let holds = match want {
                None => got.is_empty(),
                Some(Values(values)) => {
                    got == values.iter().map(String::as_str).collect::<Vec<_>>()
                }
            };
            if !holds {
                let want = match want {
                    None => "absent".to_owned(),
                    Some(Values(values)) => values_text(values.iter().map(String::as_str)),
                };
                let got = if got.is_empty() {
                    "absent".to_owned()
                } else {
                    values_text(got.into_iter())
                };
                self.found
                    .push(format!("{field}.{name}: expected {want}, got {got}"));
            }
        }
    }

    fn body(&mut self, exact: Option<&str>, contains: Option<&str>, json: Option<&Value>) {
        if exact.is_none() && contains.is_none() && json.is_none() {
            return;
        }
        let Some(bytes) = &self.outcome.body else {
            self.found.push(format!(
                "body: expected one, but a {} decision has none",
                self.outcome.kind().name()
            ));
            return;
        };
        let text = String::from_utf8_lossy(bytes);
        if let Some(exact) = exact
            && text != exact
        {
            self.found
                .push(format!("body: expected {exact:?}, got {text:?}"));
        }
        if let Some(needle) = contains
            && !text.contains(needle)
        {
            self.found
                .push(format!("body_contains: {needle:?} is not in {text:?}"));
        }
        if let Some(expected) = json {
            match serde_json::from_slice::<Value>(bytes) {
                Ok(actual) if json_subset(expected, &actual) => {}
                Ok(actual) => self
                    .found
                    .push(format!("body_json: expected {expected} within {actual}")),
                Err(e) => self
                    .found
                    .push(format!("body_json: the body is not JSON ({e}): {text:?}")),
            }
        }
    }

    fn option<T: PartialEq + fmt::Debug>(
        &mut self,
        field: &str,
        expected: &Option<Option<T>>,
        actual: &Option<T>,
    ) {
        if let Some(expected) = expected
            && expected != actual
        {
            let show = |v: &Option<T>| v.as_ref().map_or("none".to_owned(), |v| format!("{v:?}"));
            self.found.push(format!(
                "{field}: expected {}, got {} (decision {})",
                show(expected),
                show(actual),
                self.outcome.kind().name()
            ));
        }
    }

    fn bypass(&mut self, expected: Option<bool>) {
        if let Some(expected) = expected
            && expected != self.outcome.cache_bypass
        {
            self.found.push(format!(
                "cache_bypass: expected {expected}, got {} (decision {})",
                self.outcome.cache_bypass,
                self.outcome.kind().name()
            ));
        }
    }
}

fn values_text<'v>(values: impl Iterator<Item = &'v str>) -> String {
    values
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `actual` has everything `expected` has: objects may hold more
/// keys, at any depth; anything else must be equal.
fn json_subset(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => want
            .iter()
            .all(|(key, value)| got.get(key).is_some_and(|g| json_subset(value, g))),
        (Value::Array(want), Value::Array(got)) => {
            want.len() == got.len() && want.iter().zip(got).all(|(w, g)| json_subset(w, g))
        }
        _ => expected == actual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(json: &str) -> Case {
        serde_json::from_str(json).expect("a valid case")
    }

    fn view(json: &str) -> Request {
        case(json).request(1).expect("a valid request").view()
    }

    #[test]
    fn defaults_make_a_plain_get() {
        let req = case("{}").request(3).expect("a valid request").view();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", "/"));
        assert_eq!(
            (req.host.as_str(), req.client_ip.as_str()),
            ("localhost", "192.0.2.1")
        );
        assert_eq!(req.request_id, "test-3");
        assert_eq!(req.headers, [("host".to_owned(), "localhost".to_owned())]);
        assert!(req.body.is_none());
    }

    #[test]
    fn requests_the_node_could_not_receive_are_input_errors() {
        for (json, says) in [
            (r#"{"method": "G T"}"#, "not an HTTP method"),
            (r#"{"path": "nope"}"#, "must start with `/`"),
            (r#"{"path": "/a b"}"#, "not a valid path"),
            (
                r#"{"headers": {"bad name": "v"}}"#,
                "not an HTTP field name",
            ),
            (
                r#"{"headers": {"x-a": "line\nbreak"}}"#,
                "not an HTTP field value",
            ),
            (
                r#"{"headers": {"Host": "a.test"}}"#,
                "give the host as `host`",
            ),
            (r#"{"client_ip": "somewhere"}"#, "not an IP address"),
        ] {
            let problem = case(json).problem().expect(json);
            assert!(problem.contains(says), "{json}: {problem}");
        }
    }

    #[test]
    fn headers_take_objects_lists_and_pairs() {
        let c = case(r#"{"headers": {"Accept": "a", "X-Two": ["1", 2]}}"#);
        let pairs: Vec<(&str, &str)> = c
            .headers
            .0
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(pairs, [("accept", "a"), ("x-two", "1"), ("x-two", "2")]);
        let c = case(r#"{"headers": [["X-A", "1"], ["x-a", "2"]]}"#);
        assert_eq!(c.headers.0.len(), 2);
        assert!(serde_json::from_str::<Case>(r#"{"headers": "nope"}"#).is_err());
    }

    #[test]
    fn host_is_normalized_like_the_node_does() {
        assert_eq!(
            view(r#"{"host": "API.Example.com:8443"}"#).host,
            "api.example.com"
        );
        assert_eq!(view(r#"{"host": "[::1]"}"#).host, "[::1]");
        assert_eq!(view(r#"{"method": "post"}"#).method, "POST");
    }

    #[test]
    fn json_bodies_need_no_escaping() {
        let c = case(r#"{"body": {"model": "m", "temperature": 0}}"#);
        let body = c.body.expect("body").0;
        assert_eq!(body, br#"{"model":"m","temperature":0}"#);
    }

    #[test]
    fn typos_in_expectations_are_input_errors() {
        let error = serde_json::from_str::<Case>(r#"{"expect": {"stauts": 403}}"#)
            .err()
            .expect("unknown field");
        assert!(
            error.to_string().contains("unknown field `stauts`"),
            "{error}"
        );
        assert!(serde_json::from_str::<Case>(r#"{"expect": {"decision": "allow"}}"#).is_err());
    }

    #[test]
    fn expectations_compare_what_they_name() {
        let outcome = Outcome::of_request(RequestDecision::Respond(Response {
            status: 403,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"error":"forbidden","reason":"path","request_id":"x"}"#.to_vec(),
        }));
        let expect: Expect = serde_json::from_str(
            r#"{"decision": "respond", "status": 403,
                "headers": {"content-type": "application/json", "retry-after": null},
                "body_json": {"reason": "path"}, "upstream_pool": null}"#,
        )
        .expect("expect");
        assert_eq!(expect.mismatches(&outcome), Vec::<String>::new());

        let expect: Expect = serde_json::from_str(
            r#"{"status": 429, "body_json": {"reason": "method"}, "upstream_pool": "a"}"#,
        )
        .expect("expect");
        let found = expect.mismatches(&outcome);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("status: expected 429, got 403"),
            "{found:?}"
        );
    }

    #[test]
    fn printed_headers_repeat_as_lists() {
        let outcome = Outcome {
            decision: Some(DecisionKind::ContinueWith),
            set_headers: vec![
                ("a".into(), "1".into()),
                ("b".into(), "2".into()),
                ("a".into(), "3".into()),
            ],
            ..Outcome::default()
        };
        let json = serde_json::to_string(&outcome).expect("json");
        assert_eq!(
            json,
            r#"{"decision":"continue-with","set_headers":{"a":["1","3"],"b":"2"}}"#
        );
    }

    #[test]
    fn changes_apply_like_the_node() {
        let mut req = case(r#"{"headers": {"x-a": "1", "x-b": "2"}}"#)
            .request(1)
            .expect("a valid request");
        let changes = RequestChanges {
            set_headers: vec![("X-A".into(), "9".into())],
            remove_headers: vec!["x-b".into()],
            rewrite_path: Some("/new".into()),
            upstream_pool: None,
            cache_key: None,
            cache_ttl_ms: None,
            cache_bypass: false,
        };
        req.apply(&changes);
        let view = req.view();
        assert_eq!(
            view.headers,
            [
                ("host".to_owned(), "localhost".to_owned()),
                ("x-a".to_owned(), "9".to_owned())
            ]
        );
        assert_eq!(view.path, "/new");
    }
}
