//! A chat template as a model file carries it (hostile: it comes from a
//! store), compiled and rendered over messages. The first section of the
//! input is the template, the others alternate role and content; an even
//! number of sections asks for the generation prompt.
#![no_main]

use breakwater_fuzz::sections;
use breakwater_infer::chat_template::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts = sections(data);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let Ok(template) = ChatTemplate::new(&text(parts[0])) else {
        return;
    };
    let messages: Vec<Message> = parts[1..]
        .chunks(2)
        .map(|pair| {
            Message::new(
                text(pair[0]),
                pair.get(1).map(|c| text(c)).unwrap_or_default(),
            )
        })
        .collect();
    let _ = template.render(&messages, parts.len() % 2 == 0);
});
