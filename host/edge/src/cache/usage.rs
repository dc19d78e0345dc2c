//! What a stored completion cost its GPU host, read once from its own
//! `usage` when it is stored: each hit, and each waiter that followed its
//! generation live, saves that much (`breakwater_cache_tokens_saved_total`).

use bytes::Bytes;
use serde_json::Value;

/// (prompt, completion) tokens of an OpenAI-style answer: its `usage`, or
/// for a stream, the last event that carries one (`stream_options.
/// include_usage`). A stream without usage counts its content events as
/// completion tokens (one token per event, as OpenAI streams them) and no
/// prompt tokens. Not a completion: (0, 0).
pub(crate) fn completion_tokens(chunks: &[Bytes], event_stream: bool) -> (u64, u64) {
    if !event_stream {
        let body: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        return serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|answer| usage_of(&answer))
            .unwrap_or((0, 0));
    }
    let mut content_events = 0;
    let mut usage = None;
    for chunk in chunks {
        for line in chunk.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
                continue;
            };
            if let Some(counted) = usage_of(&event) {
                usage = Some(counted);
            }
            let choice = &event["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str());
            if text.is_some_and(|t| !t.is_empty()) {
                content_events += 1;
            }
        }
    }
    usage.unwrap_or((0, content_events))
}

fn usage_of(answer: &Value) -> Option<(u64, u64)> {
    let usage = answer.get("usage")?;
    Some((
        usage["prompt_tokens"].as_u64()?,
        usage["completion_tokens"].as_u64()?,
    ))
}

/// Counts what serving `tokens` without a generation saved, `times` over.
pub(crate) fn count_saved((prompt, completion): (u64, u64), times: u64) {
    if prompt > 0 {
        metrics::counter!("breakwater_cache_tokens_saved_total", "kind" => "prompt")
            .increment(prompt * times);
    }
    if completion > 0 {
        metrics::counter!("breakwater_cache_tokens_saved_total", "kind" => "completion")
            .increment(completion * times);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_comes_from_the_answer_or_its_last_usage_event() {
        let whole = Bytes::from_static(
            br#"{"id":"x","choices":[{"message":{"content":"Paris."}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
        );
        assert_eq!(completion_tokens(&[whole], false), (12, 3));
        let with_usage = [
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"Pa\"}}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"ris\"}}]}\n\n"),
            Bytes::from_static(
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
            ),
        ];
        assert_eq!(completion_tokens(&with_usage, true), (9, 2));
        // Without usage: one token per content event; the role and the
        // final events carry none.
        let without = [
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"text\":\"b\"}]}\n\n"),
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"),
        ];
        assert_eq!(completion_tokens(&without, true), (0, 2));
        assert_eq!(
            completion_tokens(&[Bytes::from_static(b"<html>")], false),
            (0, 0)
        );
    }
}
