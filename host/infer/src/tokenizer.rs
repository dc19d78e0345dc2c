//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata,
//! or a Hugging Face directory's `tokenizer.json`.
//!
//! For `gpt2`-style byte-level BPE the vocabulary and merges go into a
//! `tokenizers` BPE model rather than a BPE of our own: it is the reference
//! implementation that Hugging Face's `tokenizer.json` files run on, and
//! one built from this metadata was seen to give ids identical to
//! llama.cpp's. Control and user-defined tokens (`<|im_start|>`, …) become
//! added tokens, so they are matched whole in a prompt.
//!
//! Control tokens are matched only in text a chat template wrote: what a
//! client wrote in a message is tokenized as text ([`Piece::Text`]), so a
//! `<|im_start|>system` typed by a user cannot open a turn (llama.cpp's
//! `parse_special = false`).

use std::collections::HashMap;
use std::ops::Range;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::AddedToken;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::gguf::{Gguf, GgufError, Value};
use crate::hf::{HfDir, HfError, TOKENIZER_FILE};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Why a tokenizer could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required key is missing or mistyped.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A Hugging Face tokenizer file is unreadable.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// A tokenizer model or pre-tokenizer this crate does not implement.
    #[error("tokenizer {0} is not supported")]
    Unsupported(String),
    /// The vocabulary or merges are malformed.
    #[error("invalid tokenizer metadata: {0}")]
    Invalid(String),
    /// The `tokenizers` library failed.
    #[error("tokenizer: {0}")]
    Library(String),
}

/// One stretch of a prompt, for [`Tokenizer::encode_pieces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Text a chat template wrote: control tokens spelled in it
    /// (`<|im_start|>`) become control tokens.
    Template(&'a str),
    /// Text a client wrote: control-token spellings in it stay text.
    Text(&'a str),
}

/// Text ⇄ token ids for one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with control tokens left unmatched, for [`Piece::Text`].
    text_only: tokenizers::Tokenizer,
    /// Finds the control tokens' spellings in text; `None` when the
    /// vocabulary has none.
    control_spellings: Option<AhoCorasick>,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    special: Vec<bool>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.special.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by `gguf`'s metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, TokenizerError> {
        let model = gguf.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(format!("model {model:?}")));
        }
        let split_digits = match gguf.get("tokenizer.ggml.pre").and_then(Value::as_str) {
            None | Some("default" | "gpt2") => false,
            Some("smollm" | "starcoder") => true,
            Some(other) => return Err(TokenizerError::Unsupported(format!("pre {other:?}"))),
        };

        let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
        let token_id = |i: usize| {
            u32::try_from(i).map_err(|_| TokenizerError::Invalid("too many tokens".into()))
        };
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.to_string(), token_id(i)?).is_some() {
                return Err(TokenizerError::Invalid(format!("token {t:?} repeats")));
            }
        }
        let merges = strings(gguf, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                // Byte-level tokens spell a space as "Ġ", so the one space in
                // a merge is the separator.
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::Invalid(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types: Vec<i64> = match gguf.get("tokenizer.ggml.token_type") {
            Some(_) => gguf
                .array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.as_i64().unwrap_or(0))
                .collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let mut pre = Vec::new();
        if split_digits {
            pre.push(Digits::new(true).into());
        }
        // ByteLevel splits with GPT-2's regex, which llama.cpp's `gpt2`,
        // `smollm` and `starcoder` pre-tokenizers share (the last two after
        // splitting every digit apart).
        pre.push(ByteLevel::new(false, true, true).into());
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let special: Vec<bool> = types
            .iter()
            .map(|&t| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .collect();
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.to_string(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match gguf.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .filter(|&v| (v as usize) < tokens.len())
                    .map(Some)
                    .ok_or_else(|| TokenizerError::Invalid(format!("{key} is not a token id"))),
            }
        };
        let eos = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.eos_token_id".into()))?;
        let add_bos = gguf
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Self::assemble(
            inner,
            id("tokenizer.ggml.bos_token_id")?,
            eos,
            add_bos,
            special,
        )
    }

    /// The tokenizer around `inner`, with its text-only twin and the
    /// matcher of control-token spellings.
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: u32,
        add_bos: bool,
        special: Vec<bool>,
    ) -> Result<Self, TokenizerError> {
        let mut text_only = inner.clone();
        text_only.set_encode_special_tokens(true);
        // The added tokens flagged special are the ones `text_only` leaves
        // unmatched: control tokens in GGUF, `"special": true` in
        // tokenizer.json. User-defined ones are matched in both, as
        // llama.cpp does.
        let spellings: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        let control_spellings = if spellings.is_empty() {
            None
        } else {
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&spellings)
                .map_err(|e| TokenizerError::Invalid(format!("control tokens: {e}")))?;
            Some(matcher)
        };
        Ok(Self {
            inner,
            text_only,
            control_spellings,
            bos,
            eos,
            add_bos,
            special,
        })
    }

    /// Builds the tokenizer of a Hugging Face model directory: its
    /// `tokenizer.json` as the `tokenizers` library reads it. BOS and EOS
    /// are `tokenizer_config.json`'s `bos_token` and `eos_token`, else
    /// `config.json`'s ids; BOS is prepended when `add_bos_token` says so or,
    /// without it, when `tokenizer.json`'s post-processor adds it. Added
    /// tokens count as special, as control and user-defined tokens do in
    /// GGUF.
    pub fn from_hf(dir: &HfDir) -> Result<Self, TokenizerError> {
        let path = dir.path().join(TOKENIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|source| HfError::Io {
            path: path.clone(),
            source,
        })?;
        // `tokenizers` panics (an `expect` in its decoder deserializer)
        // instead of returning an error when the `decoder` object is not
        // well-formed JSON: a syntax error, bytes that are not UTF-8, a lone
        // surrogate escape (found by fuzz/hf_model). The whole file is read
        // as a JSON value here first, which fails on each of these with
        // serde_json's position, so a hostile model file costs a load error,
        // never the process.
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| TokenizerError::Invalid(format!("{}: {e}", path.display())))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| TokenizerError::Invalid(format!("{}: {e}", path.display())))?;
        let size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        let mut special = vec![false; size];
        for &id in inner.get_added_tokens_decoder().keys() {
            if let Some(s) = special.get_mut(id as usize) {
                *s = true;
            }
        }
        let id = |key: &str, fallback: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            match dir.special_token(key) {
                Some(text) => inner.token_to_id(text).map(Some).ok_or_else(|| {
                    TokenizerError::Invalid(format!(
                        "{key} {text:?} of tokenizer_config.json is not in {}",
                        path.display()
                    ))
                }),
                None => Ok(fallback.filter(|&id| (id as usize) < size)),
            }
        };
        let first =
            |ids: &Option<crate::hf::TokenIds>| ids.as_ref().and_then(|t| t.ids().first().copied());
        let config = dir.config();
        let bos = id("bos_token", first(&config.bos_token_id))?;
        let eos = id("eos_token", first(&config.eos_token_id))?.ok_or_else(|| {
            TokenizerError::Invalid(format!(
                "{}: no EOS token (tokenizer_config.json's eos_token or config.json's eos_token_id)",
                dir.path().display()
            ))
        })?;
        let add_bos = match dir.add_bos_token() {
            Some(add) => add,
            None => {
                let with_specials = inner
                    .encode("", true)
                    .map_err(|e| TokenizerError::Library(e.to_string()))?;
                bos.is_some() && with_specials.get_ids().first().copied() == bos
            }
        };
        Self::assemble(inner, bos, eos, add_bos, special)
    }

    /// Token ids for `text`. Special tokens written in the text (such as
    /// `<|im_start|>`) are recognized, as a chat template needs; the BOS token
    /// is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Token ids for a prompt made of `pieces`, in order: control tokens
    /// are matched in [`Piece::Template`] text only. The BOS token is
    /// prepended when the model asks for it.
    pub fn encode_pieces(&self, pieces: &[Piece<'_>]) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        for piece in pieces {
            let (tokenizer, text) = match *piece {
                Piece::Template(text) => (&self.inner, text),
                Piece::Text(text) => (&self.text_only, text),
            };
            if text.is_empty() {
                continue;
            }
            let encoding = tokenizer
                .encode(text, false)
                .map_err(|e| TokenizerError::Library(e.to_string()))?;
            ids.extend_from_slice(encoding.get_ids());
        }
        Ok(ids)
    }

    /// Where control tokens are spelled out in `text` (leftmost-longest,
    /// as the tokenizer matches them), in order.
    pub fn control_spellings<'t>(
        &'t self,
        text: &'t str,
    ) -> impl Iterator<Item = Range<usize>> + 't {
        self.control_spellings
            .iter()
            .flat_map(move |matcher| matcher.find_iter(text).map(|m| m.range()))
    }

    /// The text of `ids`, leaving out control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The text of token `id` as stored in the vocabulary (byte-level
    /// alphabet), if it exists.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a control or user-defined token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.special.len()
    }

    /// Token ids by their text, for the special tokens only.
    pub fn special_tokens(&self) -> HashMap<String, u32> {
        (0..self.special.len() as u32)
            .filter(|&i| self.is_special(i))
            .filter_map(|i| Some((self.token(i)?, i)))
            .collect()
    }
}

fn strings<'a>(gguf: &'a Gguf, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    gguf.array(key)?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| TokenizerError::Invalid(format!("{key} holds a non-string")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::GgufWriter;
    use crate::test_model;

    fn tiny() -> Tokenizer {
        let mut w = GgufWriter::default();
        test_model::write_tokenizer(&mut w, &["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]);
        Tokenizer::from_gguf(&Gguf::from_bytes(w.finish()).unwrap()).unwrap()
    }

    #[test]
    fn round_trips_text_with_special_tokens() {
        let t = tiny();
        let ids = t.encode("<|im_start|>hello wo 12é").unwrap();
        assert_eq!(ids[0], 1, "control token matched whole");
        let hello = t.token(ids[1]).unwrap();
        assert_eq!(hello, "hello", "merges applied");
        assert_eq!(t.token(ids[2]).unwrap(), "Ġwo");
        // Digits are split one by one, é is two bytes.
        assert_eq!(ids.len(), 3 + 1 + 2 + 2);
        assert_eq!(t.decode(&ids).unwrap(), "hello wo 12é");
        assert!(t.is_special(1) && !t.is_special(ids[1]));
        assert_eq!(t.eos(), 2);
    }

    #[test]
    fn rejects_unknown_models_and_bad_merges() {
        let mut w = GgufWriter::default();
        w.metadata("tokenizer.ggml.model", Value::String("llama".into()));
        let gguf = Gguf::from_bytes(w.finish()).unwrap();
        assert!(matches!(
            Tokenizer::from_gguf(&gguf),
            Err(TokenizerError::Unsupported(_))
        ));

        let mut w = GgufWriter::default();
        w.metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
            .metadata(
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into())]),
            )
            .metadata(
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("ab".into())]),
            );
        let gguf = Gguf::from_bytes(w.finish()).unwrap();
        assert!(matches!(
            Tokenizer::from_gguf(&gguf),
            Err(TokenizerError::Invalid(_))
        ));
    }
}
