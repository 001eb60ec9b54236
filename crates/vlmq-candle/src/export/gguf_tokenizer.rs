//! The `tokenizer.ggml.*` metadata of a GGUF file, from a Hugging Face
//! directory's `tokenizer.json` (byte-level BPE, llama.cpp's `gpt2` model),
//! `tokenizer_config.json` (chat template) and `config.json` (special ids).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use vlmq::{Error, Result};

use crate::error::file;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| file(path, e))
}

/// The tokenizer keys for the tokenizer in `dir` (none when the directory
/// has no `tokenizer.json`): tokens by id (ids no token names become
/// `[PAD{id}]`, type unused), token types (special added tokens control,
/// other added tokens user-defined), merges, bos/eos/pad ids and the chat
/// template. Only byte-level BPE tokenizers are written; anything else is
/// an error naming `tokenizer.json`'s `model.type`.
pub(crate) fn tokenizer_metadata(dir: &Path) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let Some(tk) = read_json(&path)? else {
        return Ok(Vec::new());
    };
    let model = &tk["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(Error::field(
            &path,
            "model.type",
            format!(
                "is {}: only byte-level BPE tokenizers (llama.cpp's gpt2 model) are written to GGUF",
                model["type"]
            ),
        ));
    }
    let Some(vocab) = model["vocab"].as_object() else {
        return Err(Error::field(&path, "model.vocab", "is not an object"));
    };
    let mut entries: Vec<(usize, String, i32)> = Vec::new();
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::field(&path, "model.vocab", format!("{token:?}: id")))?;
        entries.push((id as usize, token.clone(), NORMAL));
    }
    for added in tk["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(Error::field(
                &path,
                "added_tokens",
                "entry without id or content",
            ));
        };
        let ty = if added["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        entries.retain(|e| e.0 != id as usize);
        entries.push((id as usize, content.to_string(), ty));
    }
    let n = entries.iter().map(|e| e.0 + 1).max().unwrap_or(0);
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![UNUSED; n];
    for (id, token, ty) in entries {
        tokens[id] = token;
        types[id] = ty;
    }
    let mut merges = Vec::new();
    for m in model["merges"].as_array().into_iter().flatten() {
        let text = match m {
            Json::String(s) => s.clone(),
            Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => {
                format!(
                    "{} {}",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_str().unwrap_or("")
                )
            }
            other => {
                return Err(Error::field(
                    &path,
                    "model.merges",
                    format!("entry {other}"),
                ))
            }
        };
        merges.push(Value::String(text));
    }
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
    for (key, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        // eos may be a list in newer configs: llama.cpp takes one id.
        let id = match &config[key] {
            Json::Array(ids) => ids.first().and_then(Json::as_u64),
            v => v.as_u64(),
        };
        if let Some(id) = id {
            meta.push((gguf.into(), Value::U32(id as u32)));
        }
    }
    let tk_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    if let Some(t) = tk_config["chat_template"].as_str() {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    if let Some(b) = tk_config["add_bos_token"].as_bool() {
        meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
    }
    Ok(meta)
}
