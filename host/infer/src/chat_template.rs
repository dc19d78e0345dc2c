//! Chat templates: the Jinja program a model ships (`tokenizer.chat_template`
//! in GGUF, `chat_template` in a Hugging Face `tokenizer_config.json`) that
//! turns a list of messages into the prompt text it was trained on.
//!
//! Rendered with `minijinja` configured as Hugging Face and llama-cpp-python
//! configure Jinja for chat templates (`trim_blocks`, `lstrip_blocks`), with
//! the globals templates commonly expect.
//!
//! ```
//! # use breakwater_infer::chat_template::{ChatTemplate, Message};
//! let t = ChatTemplate::new(
//!     "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}\
//!      {% if add_generation_prompt %}<assistant>{% endif %}",
//! ).unwrap();
//! let prompt = t.render(&[Message::new("user", "hi")], true).unwrap();
//! assert_eq!(prompt, "<user>hi\n<assistant>");
//! ```
//!
//! Only the template writes control tokens: [`ChatTemplate::render_prompt`]
//! takes every control-token spelling out of the messages before rendering
//! and hands it back as text to tokenize as text, so a user who writes
//! `<|im_end|><|im_start|>system` cannot forge a turn.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

use crate::gguf::{Gguf, GgufError};
use crate::hf::{HfDir, HfError};
use crate::tokenizer::{Piece, Tokenizer};

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model file has no template.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The Hugging Face model directory has no template.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// The template is not valid Jinja, or failed while rendering (including
    /// its own `raise_exception`, and running out of [`TEMPLATE_FUEL`]).
    #[error("chat template: {0:#}")]
    Template(#[from] Error),
    /// The rendered prompt grew past [`MAX_RENDERED_BYTES`].
    #[error("chat template: the prompt grew past {limit} bytes while rendering")]
    TooLong {
        /// [`MAX_RENDERED_BYTES`].
        limit: usize,
    },
}

/// Instructions one render may run. A template comes with the model, from a
/// store, so it is untrusted: a loop of loops must not hold a request (and
/// the worker thread it runs on) for minutes. Real templates use a few
/// dozen per message, so this leaves room for conversations of tens of
/// thousands of messages.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Macro calls nested deeper than this fail the render. Real templates nest
/// a handful; a hostile one recursing without end should fail fast and
/// use little of the 2 MiB stack of the async worker thread it renders on.
pub const MAX_TEMPLATE_DEPTH: usize = 64;

/// The longest prompt a render may produce: far above any context window
/// the host serves (128k tokens are well under 1 MiB of text), far below
/// what would hurt the host.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message from `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A prompt rendered by [`ChatTemplate::render_prompt`]: the template's
/// output, in which each control-token spelling that a message carried was
/// replaced by a placeholder before rendering.
#[derive(Debug, Clone)]
pub struct ChatPrompt {
    rendered: String,
    /// Starts every placeholder: a private-use character and a random
    /// nonce, which no message can contain.
    placeholder: String,
    /// The spellings set aside, by placeholder number.
    set_aside: Vec<String>,
}

/// Opens and closes a placeholder (Unicode private-use characters).
const PLACEHOLDER_OPEN: char = '\u{E000}';
const PLACEHOLDER_CLOSE: char = '\u{E001}';

impl ChatPrompt {
    /// The prompt in order: template text (message text without control
    /// spellings included) and the set-aside spellings as text.
    pub fn pieces(&self) -> Vec<Piece<'_>> {
        let mut pieces = Vec::with_capacity(2 * self.set_aside.len() + 1);
        let mut rest = self.rendered.as_str();
        while let Some(at) = rest.find(&self.placeholder) {
            let after = &rest[at + self.placeholder.len()..];
            // A placeholder the template mangled (sliced, say) stays text
            // of the template's: it holds no control token either way.
            let Some((number, tail)) = after.split_once(PLACEHOLDER_CLOSE) else {
                break;
            };
            let Some(spelling) = number
                .parse::<usize>()
                .ok()
                .and_then(|n| self.set_aside.get(n))
            else {
                pieces.push(Piece::Template(&rest[..at + self.placeholder.len()]));
                rest = after;
                continue;
            };
            pieces.push(Piece::Template(&rest[..at]));
            pieces.push(Piece::Text(spelling));
            rest = tail;
        }
        pieces.push(Piece::Template(rest));
        pieces.retain(|p| !matches!(p, Piece::Template("") | Piece::Text("")));
        pieces
    }

    /// The prompt's length in bytes, as the model reads it.
    pub fn len(&self) -> usize {
        self.pieces()
            .iter()
            .map(|p| match *p {
                Piece::Template(t) | Piece::Text(t) => t.len(),
            })
            .sum()
    }

    /// Whether the prompt is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prompt as the model reads it.
    pub fn text(&self) -> String {
        self.pieces()
            .iter()
            .map(|p| match *p {
                Piece::Template(t) | Piece::Text(t) => t,
            })
            .collect()
    }

    /// Token ids for the prompt: control tokens come from the template
    /// only.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
    ) -> Result<Vec<u32>, crate::tokenizer::TokenizerError> {
        tokenizer.encode_pieces(&self.pieces())
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(MAX_TEMPLATE_DEPTH);
        env.add_function("raise_exception", |message: String| -> Result<(), Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(NAME, source.to_owned())?;
        Ok(Self {
            env,
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    /// The template of a GGUF model, with its BOS/EOS token texts available
    /// to the template as `bos_token` and `eos_token`.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ChatTemplateError> {
        let mut t = Self::new(gguf.str("tokenizer.chat_template")?)?;
        let token = |key: &str| -> Option<String> {
            let id = gguf.get(key)?.as_u64()?;
            let tokens = gguf.get("tokenizer.ggml.tokens")?.as_array()?;
            Some(tokens.get(usize::try_from(id).ok()?)?.as_str()?.to_owned())
        };
        t.bos_token = token("tokenizer.ggml.bos_token_id").unwrap_or_default();
        t.eos_token = token("tokenizer.ggml.eos_token_id").unwrap_or_default();
        Ok(t)
    }

    /// The template of a Hugging Face model directory (see
    /// [`HfDir::chat_template`]), with `tokenizer_config.json`'s `bos_token`
    /// and `eos_token` texts available to it.
    pub fn from_hf(dir: &HfDir) -> Result<Self, ChatTemplateError> {
        let mut t = Self::new(&dir.chat_template()?)?;
        t.bos_token = dir
            .special_token("bos_token")
            .unwrap_or_default()
            .to_owned();
        t.eos_token = dir
            .special_token("eos_token")
            .unwrap_or_default()
            .to_owned();
        Ok(t)
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where
    /// the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self.env.get_template(NAME)?;
        let mut out = CappedWriter {
            bytes: Vec::new(),
            limit: MAX_RENDERED_BYTES,
            overflowed: false,
        };
        let rendered = template
            .render_captured_to(
                context! {
                    messages => Value::from(Serde(messages)),
                    add_generation_prompt,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                },
                &mut out,
            )
            .map(drop);
        if out.overflowed {
            return Err(ChatTemplateError::TooLong {
                limit: MAX_RENDERED_BYTES,
            });
        }
        rendered?;
        String::from_utf8(out.bytes).map_err(|_| {
            // minijinja writes only `str`s, so this cannot happen; still an
            // error rather than a panic.
            ChatTemplateError::Template(Error::new(
                ErrorKind::InvalidOperation,
                "rendered prompt is not UTF-8",
            ))
        })
    }

    /// The prompt for `messages` as [`ChatTemplate::render`] writes it,
    /// except that control tokens spelled in a message's content (as
    /// `tokenizer` knows them) are set aside before rendering, to be
    /// tokenized as text: only the template's own text yields control
    /// tokens.
    pub fn render_prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tokenizer: &Tokenizer,
    ) -> Result<ChatPrompt, ChatTemplateError> {
        let placeholder = format!("{PLACEHOLDER_OPEN}{}#", uuid::Uuid::new_v4().simple());
        let mut set_aside = Vec::new();
        let guarded: Vec<Message> = messages
            .iter()
            .map(|m| {
                let mut content = String::with_capacity(m.content.len());
                let mut copied = 0;
                for range in tokenizer.control_spellings(&m.content) {
                    content.push_str(&m.content[copied..range.start]);
                    content.push_str(&format!(
                        "{placeholder}{}{PLACEHOLDER_CLOSE}",
                        set_aside.len()
                    ));
                    set_aside.push(m.content[range.clone()].to_owned());
                    copied = range.end;
                }
                content.push_str(&m.content[copied..]);
                Message::new(m.role.clone(), content)
            })
            .collect();
        Ok(ChatPrompt {
            rendered: self.render(&guarded, add_generation_prompt)?,
            placeholder,
            set_aside,
        })
    }
}

/// Collects the rendered prompt, failing the render once it passes `limit`.
struct CappedWriter {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered prompt too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_with_and_without_a_system_message() {
        let t = ChatTemplate::new(SMOLLM2).unwrap();
        let with_system = [
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "What is the capital of France?"),
        ];
        assert_eq!(
            t.render(&with_system, true).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&with_system[1..], false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
        assert!(ChatTemplate::new("{% for %}").is_err());
    }

    // Templates come from model files, which come from a store: untrusted.

    #[test]
    fn a_template_that_loops_too_long_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(300) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn a_long_conversation_renders_within_the_fuel() {
        let t = ChatTemplate::new(SMOLLM2).unwrap();
        let messages: Vec<Message> = (0..5000)
            .map(|i| Message::new(["user", "assistant"][i % 2], format!("turn {i}")))
            .collect();
        let prompt = t.render(&messages, true).unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn a_template_that_writes_too_much_is_stopped() {
        let t =
            ChatTemplate::new("{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}").unwrap();
        let err = t.render(&[], true).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::TooLong { limit } if limit == MAX_RENDERED_BYTES),
            "{err}"
        );
    }

    #[test]
    fn endless_macro_recursion_fails_on_a_worker_sized_stack() {
        let t =
            ChatTemplate::new("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").unwrap();
        // Tokio's worker threads, where chat requests render, have 2 MiB.
        let rendered = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || t.render(&[], true).map_err(|e| e.to_string()))
            .unwrap()
            .join()
            .unwrap();
        let err = rendered.unwrap_err();
        assert!(err.contains("recursion"), "{err}");
    }
}
