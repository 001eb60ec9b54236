//! The chat template of a GGUF file: llama.cpp's converters store the
//! model's template as `tokenizer.chat_template` and its special tokens as
//! ids into `tokenizer.ggml.tokens`.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::Value as Json;
use vlmq::{Error, Result};

use crate::process::chat_template::ChatTemplate;

/// The special tokens a template may read, by the GGUF key of their id.
const SPECIAL_TOKENS: [(&str, &str); 4] = [
    ("bos_token", "tokenizer.ggml.bos_token_id"),
    ("eos_token", "tokenizer.ggml.eos_token_id"),
    ("pad_token", "tokenizer.ggml.padding_token_id"),
    ("unk_token", "tokenizer.ggml.unknown_token_id"),
];

impl ChatTemplate {
    /// Reads and compiles the template of the GGUF file `path`
    /// (`tokenizer.chat_template`), with the special tokens its
    /// `tokenizer.ggml.*_token_id` keys name. A file without a template, or
    /// with a token id outside `tokenizer.ggml.tokens`, is an
    /// [`Error::InvalidField`] naming the file and the key.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let content = crate::read_gguf_content(path)?;
        Self::from_gguf_content(&content, path)
    }

    /// [`ChatTemplate::from_gguf`] on a GGUF header already read;
    /// `path` names the file in errors.
    pub fn from_gguf_content(c: &Content, path: &Path) -> Result<Self> {
        const KEY: &str = "tokenizer.chat_template";
        let source = match c.metadata.get(KEY) {
            Some(v) => v
                .to_string()
                .map_err(|e| Error::field(path, KEY, format!("is not a string ({e})")))?
                .clone(),
            None => {
                return Err(Error::field(
                    path,
                    KEY,
                    "is missing: conversations need the model's chat template",
                ))
            }
        };
        let tokens = c.metadata.get("tokenizer.ggml.tokens").map(Value::to_vec);
        let mut special = serde_json::Map::new();
        for (name, key) in SPECIAL_TOKENS {
            let Some(id) = c.metadata.get(key) else {
                continue;
            };
            let id = id
                .to_u32()
                .map_err(|e| Error::field(path, key, format!("is not a token id ({e})")))?;
            let token = match &tokens {
                Some(Ok(list)) => list.get(id as usize).and_then(|t| t.to_string().ok()),
                _ => None,
            };
            let token = token.ok_or_else(|| {
                Error::field(
                    path,
                    key,
                    format!("{id} names no entry of tokenizer.ggml.tokens"),
                )
            })?;
            special.insert(name.to_string(), Json::String(token.clone()));
        }
        ChatTemplate::new(source, Json::Object(special))
    }
}
