//! From generated token ids to the text a client sees: incremental
//! detokenization and stop sequences.

use crate::tokenizer::Tokenizer;

/// Turns a growing list of token ids into text deltas.
///
/// Decoding token by token is wrong for byte-level BPE: a character can span
/// tokens, and decoders may treat the first token of a text differently. So,
/// as Hugging Face's text-generation-inference does, it decodes a short
/// window of recent ids with and without the newest ones and emits the
/// difference, holding text back while it ends in an incomplete character.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Ids before this have been emitted as text.
    read: usize,
}

impl Detokenizer {
    /// Adds `id` and returns the text it completes (often empty while a
    /// multi-byte character is being spelled).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(before) = tokenizer.decode(&self.ids[self.prefix..self.read]) else {
            return String::new();
        };
        let Ok(after) = tokenizer.decode(&self.ids[self.prefix..]) else {
            return String::new();
        };
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            return String::new();
        }
        let Some(delta) = after
            .get(before.len()..)
            .filter(|_| after.starts_with(&before))
        else {
            // The window's text changed under the new ids (rare with
            // byte-level BPE); emit nothing rather than garble, and restart
            // the window at the new ids.
            self.prefix = self.read;
            self.read = self.ids.len();
            return String::new();
        };
        let delta = delta.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        delta
    }

    /// The text of ids still held back (an incomplete character comes out
    /// as U+FFFD), when generation ends.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let before = tokenizer.decode(&self.ids[self.prefix..self.read]);
        let after = tokenizer.decode(&self.ids[self.prefix..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        match (before, after) {
            (Ok(b), Ok(a)) => a.get(b.len()..).unwrap_or_default().to_owned(),
            _ => String::new(),
        }
    }
}

/// Watches generated text for stop sequences, holding back any tail that
/// could be the start of one so that a stop sequence is never emitted, even
/// in part.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Decoded text not yet emitted.
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Keep generating; emit this text.
    No(String),
    /// A stop sequence appeared: emit this text (what came before it) and
    /// finish.
    Yes(String),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds newly decoded `text`.
    ///
    /// ```
    /// # use breakwater_infer::scheduler::text::{StopMatcher, Stopped};
    /// let mut m = StopMatcher::new(vec!["\n\n".into()]);
    /// assert_eq!(m.push("Hello.\n"), Stopped::No("Hello.".into()));
    /// assert_eq!(m.push("\nBye"), Stopped::Yes("".into()));
    /// ```
    pub fn push(&mut self, text: &str) -> Stopped {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return Stopped::No(std::mem::take(&mut self.pending));
        }
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.pending.truncate(at);
            return Stopped::Yes(std::mem::take(&mut self.pending));
        }
        // The earliest position from which the rest of the text is a prefix
        // of some stop sequence; everything before it is safe to emit.
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let rest = self.pending.split_off(hold_from);
        Stopped::No(std::mem::replace(&mut self.pending, rest))
    }

    /// The held-back text, when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_matches_and_releases_them() {
        let mut m = StopMatcher::new(vec!["STOP".into(), "".into()]);
        assert_eq!(m.push("abc ST"), Stopped::No("abc ".into()));
        assert_eq!(m.push("ep"), Stopped::No("STep".into()));
        assert_eq!(m.push("xS"), Stopped::No("x".into()));
        assert_eq!(m.flush(), "S");
        assert_eq!(m.push("aSTO"), Stopped::No("a".into()));
        assert_eq!(m.push("Pzz"), Stopped::Yes("".into()));
    }

    #[test]
    fn earliest_stop_wins_and_unicode_is_split_on_characters() {
        let mut m = StopMatcher::new(vec!["é!".into(), "b".into()]);
        assert_eq!(m.push("aé"), Stopped::No("a".into()));
        assert_eq!(m.push("xé!b"), Stopped::Yes("éx".into()));
        let mut none = StopMatcher::new(Vec::new());
        assert_eq!(none.push("anything"), Stopped::No("anything".into()));
    }
}
