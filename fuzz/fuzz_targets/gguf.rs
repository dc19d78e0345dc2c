//! A GGUF file as a model store serves it: untrusted. Parsed, then read
//! the way the GPU host reads it: every tensor's bytes, the llama weights,
//! the tokenizer and the chat template.
#![no_main]

use breakwater_infer::chat_template::{ChatTemplate, Message};
use breakwater_infer::gguf::Gguf;
use breakwater_infer::model::llama::Llama;
use breakwater_infer::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(gguf) = Gguf::from_bytes(bytes.to_vec()) else {
        return;
    };
    for info in gguf.tensors() {
        let (_, data) = gguf
            .tensor_bytes(&info.name)
            .expect("a listed tensor has bytes");
        assert_eq!(data.len(), info.range.len());
    }
    let _ = Llama::from_gguf(&gguf);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&gguf) {
        if let Ok(ids) = tokenizer.encode("Hello <|im_start|>world ünï") {
            let _ = tokenizer.decode(&ids);
        }
        let _ = tokenizer.decode(&[0, 1, 2, u32::MAX]);
    }
    if let Ok(template) = ChatTemplate::from_gguf(&gguf) {
        let _ = template.render(&[Message::new("user", "hi")], true);
    }
});
