//! Server-sent events as OpenAI-style streams use them, for the parts of
//! the node that read an answer's events on the way out (token budgets,
//! mid-stream failover).

use bytes::Bytes;

/// The end of the first complete event in `bytes` (after its blank line).
pub(crate) fn find_event_end(bytes: &[u8]) -> Option<usize> {
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `data:` field of an event (its first data line).
pub(crate) fn event_data(event: &[u8]) -> Option<&[u8]> {
    event
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"data:"))
        .map(<[u8]>::trim_ascii)
}

/// An event carrying `data` (JSON, on one line).
pub(crate) fn data_event(data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// The event that ends a stream in error, in OpenAI's error shape, which
/// its SDKs raise on: `code` is also the `type`.
pub(crate) fn error_event(code: &str, message: &str) -> Bytes {
    data_event(&serde_json::json!({
        "error": { "message": message, "type": code, "code": code }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_a_blank_line_of_either_kind() {
        assert_eq!(find_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(find_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(find_event_end(b"data: a\n"), None);
        assert_eq!(
            event_data(b"event: x\ndata: [DONE]\n\n"),
            Some(&b"[DONE]"[..])
        );
    }

    #[test]
    fn an_error_event_is_one_data_line_with_the_code() {
        let event = error_event("upstream_lost", "gone");
        let text = std::str::from_utf8(&event).expect("UTF-8");
        assert!(
            text.starts_with("data: {") && text.ends_with("}\n\n"),
            "{text}"
        );
        let value: serde_json::Value =
            serde_json::from_slice(event_data(&event).expect("data")).expect("JSON");
        assert_eq!(value["error"]["code"], "upstream_lost");
    }
}
