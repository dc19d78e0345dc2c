//! A Hugging Face model directory as a model store serves it: untrusted.
//! Sections of the input (see `sections`) become `config.json`,
//! `model.safetensors`, `tokenizer_config.json`, `generation_config.json`
//! and `tokenizer.json`; the directory is then opened and read the way the
//! GPU host reads it.
#![no_main]

use breakwater_fuzz::sections;
use breakwater_infer::chat_template::{ChatTemplate, Message};
use breakwater_infer::hf::HfDir;
use breakwater_infer::model::llama::Llama;
use breakwater_infer::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

const FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer_config.json",
    "generation_config.json",
    "tokenizer.json",
];

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, bytes) in FILES.iter().zip(sections(data)) {
        std::fs::write(dir.path().join(name), bytes).expect("write a model file");
    }
    let Ok(hf) = HfDir::open(dir.path()) else {
        return;
    };
    let _ = hf.llama_config();
    let _ = hf.end_token_ids();
    let _ = hf.add_bos_token();
    let _ = Llama::from_hf(&hf);
    if let Ok(tokenizer) = Tokenizer::from_hf(&hf)
        && let Ok(ids) = tokenizer.encode("Hello <|im_start|>world")
    {
        let _ = tokenizer.decode(&ids);
    }
    if let Ok(template) = ChatTemplate::from_hf(&hf) {
        let _ = template.render(&[Message::new("user", "hi")], true);
    }
});
