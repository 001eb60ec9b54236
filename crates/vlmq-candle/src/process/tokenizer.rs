//! Tokenizers: from `tokenizer.json`, or rebuilt from a GGUF file's
//! `tokenizer.ggml.*` keys (byte-level BPE: tokens, merges, token types).
//! Pure Rust (the `tokenizers` crate with its `fancy-regex` feature only).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};
use vlmq::{Error, Result};

use crate::load::gguf::meta;

pub use tokenizers;

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        reason: format!("tokenizer: {reason}"),
    }
}

/// Loads a `tokenizer.json`.
pub fn tokenizer_from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
        ));
    }
    // The tokenizers crate panics on some malformed files (found by
    // fuzzing: a decoder entry of the wrong shape); contain it as an error.
    std::panic::catch_unwind(|| Tokenizer::from_file(path))
        .map_err(|_| {
            bad(
                path,
                "the file is malformed (the tokenizer library panicked reading it)",
            )
        })?
        .map_err(|e| bad(path, e))
}

fn strings<'a>(c: &'a Content, key: &str, path: &Path) -> Result<Vec<&'a str>> {
    let v = meta(c, key, path)?.to_vec().map_err(|e| bad(path, e))?;
    v.iter()
        .map(|x| x.to_string().map(String::as_str).map_err(|e| bad(path, e)))
        .collect()
}

/// Builds the byte-level BPE tokenizer a GGUF file describes
/// (`tokenizer.ggml.model = gpt2`). Control tokens (type 3) and
/// user-defined ones (type 4) become special added tokens. The `smollm`
/// pre-tokenizer splits digits one by one before the byte-level split.
pub fn tokenizer_from_gguf(c: &Content, path: &Path) -> Result<Tokenizer> {
    let model = meta(c, "tokenizer.ggml.model", path)?
        .to_string()
        .map_err(|e| bad(path, e))?;
    if model != "gpt2" {
        return Err(bad(
            path,
            format!("unsupported tokenizer model {model:?} (only gpt2 byte-level BPE)"),
        ));
    }
    let tokens = strings(c, "tokenizer.ggml.tokens", path)?;
    let merges: Vec<(String, String)> = strings(c, "tokenizer.ggml.merges", path)?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(path, format!("merge {m:?} is not two symbols")))
        })
        .collect::<Result<_>>()?;
    let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.to_i32().map_or(1, i64::from)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(path, e))?;
    let mut tk = Tokenizer::new(bpe);
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map_or("default", String::as_str);
    let byte_level = ByteLevel::new(false, true, true);
    let pt: PreTokenizerWrapper = if pre == "smollm" {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tk.with_pre_tokenizer(Some(pt));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == 3 || ty == 4)
        .map(|(t, _)| AddedToken::from(t.to_string(), true))
        .collect();
    tk.add_special_tokens(special).map_err(|e| bad(path, e))?;
    Ok(tk)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tk: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tk.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| Error::Backend {
            block: usize::MAX,
            layer: None,
            reason: format!("tokenizer: {e}"),
        })
}
