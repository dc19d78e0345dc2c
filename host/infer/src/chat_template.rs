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

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

use crate::gguf::{Gguf, GgufError};
use crate::hf::{HfDir, HfError};

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
    /// its own `raise_exception`).
    #[error("chat template: {0:#}")]
    Template(#[from] Error),
}

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
        Ok(template.render(context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
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
}
