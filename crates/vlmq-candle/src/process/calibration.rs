//! Calibration data in the forms users already have, read by one function
//! ([`Calibration::from_file`]):
//!
//! - a plain text file, cut into windows of the recipe's `seq_len` tokens;
//! - JSON lines of text records: `{"text": "..."}`, optionally with
//!   `"images": ["a.png", ...]` (paths relative to the JSONL file) for a
//!   vision-language model whose text carries one image marker per image;
//! - JSON lines of conversations (`{"messages": [...]}`, the format of
//!   [`conversation`](crate::process::conversation)), rendered with the
//!   model's chat template; images are parts of the messages.
//!
//! The first record of a JSONL file decides which of the two kinds the file
//! holds.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlmq::{Error, Result};

use crate::process::conversation::{read_conversations, Conversation};

/// One calibration record: a text and the images its markers refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationRecord {
    /// The text (a prompt with its answer, a document...).
    pub text: String,
    /// Image files, one per image marker of `text`.
    pub images: Vec<PathBuf>,
}

/// Calibration data before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Calibration {
    /// One long text, cut into consecutive windows of `seq_len` tokens of
    /// which `samples` are drawn by the recipe's seed.
    Text(String),
    /// Separate records, each one sample (cut to `seq_len` tokens when it
    /// has no images); `samples` of them are drawn by the recipe's seed.
    Records(Vec<CalibrationRecord>),
    /// Conversations, each one sample (rendered with the model's chat
    /// template, cut to `seq_len` tokens when it has no images); `samples`
    /// of them are drawn by the recipe's seed.
    Conversations(Vec<Conversation>),
    /// Token ids the caller has already cut into samples (as GPTQModel
    /// takes `input_ids` lists), each cut to `seq_len` tokens; `samples` of
    /// them are drawn by the recipe's seed. The ids must be the model's.
    Tokens(Vec<Vec<u32>>),
}

impl Calibration {
    /// Reads `path`: a `.jsonl` file as [`Calibration::Conversations`] when
    /// its first record has `messages`, else as [`Calibration::Records`];
    /// anything else as [`Calibration::Text`]. A malformed line is an
    /// [`Error::InvalidField`] naming the file, the line and the key.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Calibration> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        if path.extension().is_some_and(|e| e == "jsonl") {
            if first_is_conversation(&text) {
                return Ok(Calibration::Conversations(read_conversations(path)?));
            }
            let base = path.parent().unwrap_or(Path::new("."));
            let mut records = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if !line.trim().is_empty() {
                    records.push(record(line, i + 1, path, base)?);
                }
            }
            if records.is_empty() {
                return Err(Error::field(path, "records", "the file has no record"));
            }
            Ok(Calibration::Records(records))
        } else if text.trim().is_empty() {
            Err(Error::field(path, "text", "the file is empty"))
        } else {
            Ok(Calibration::Text(text))
        }
    }
}

/// Whether the first non-blank line is a JSON object with a `messages` key.
fn first_is_conversation(text: &str) -> bool {
    let Some(first) = text.lines().find(|l| !l.trim().is_empty()) else {
        return false;
    };
    serde_json::from_str::<Value>(first).is_ok_and(|v| v.get("messages").is_some())
}

/// Parses line `n` of a JSONL calibration file of text records.
fn record(line: &str, n: usize, path: &Path, base: &Path) -> Result<CalibrationRecord> {
    let bad = |key: &str, why: String| Error::field(path, format!("line {n}: {key}"), why);
    let v: Value = serde_json::from_str(line).map_err(|e| bad("json", e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("json", "a record is a JSON object".into()))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "text" | "images"))
    {
        return Err(bad(
            k,
            "unknown key (text records have \"text\" and \"images\"; a file of \
             conversations has \"messages\" on every line)"
                .into(),
        ));
    }
    let text = match obj.get("text") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(bad("text", "is empty".into())),
        Some(_) => return Err(bad("text", "is not a string".into())),
        None => return Err(bad("text", "is missing".into())),
    };
    let images = match obj.get("images") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(|s| base.join(s))
                    .ok_or_else(|| bad("images", "holds a value that is not a file name".into()))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("images", "is not a list of file names".into())),
    };
    Ok(CalibrationRecord { text, images })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, body: &str) -> Result<Calibration> {
        let dir = std::env::temp_dir().join(format!("vlmq-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        Calibration::from_file(&p)
    }

    #[test]
    fn jsonl_records_with_images_relative_to_the_file() {
        let c = read(
            "a.jsonl",
            "{\"text\": \"hi\"}\n\n{\"text\": \"x\", \"images\": [\"i.png\"]}\n",
        )
        .unwrap();
        let Calibration::Records(r) = c else {
            panic!("records expected")
        };
        assert_eq!(r.len(), 2);
        assert!(r[0].images.is_empty());
        assert!(r[1].images[0].ends_with("i.png") && r[1].images[0].is_absolute());
    }

    #[test]
    fn a_file_whose_first_record_has_messages_is_conversations() {
        let c = read(
            "c.jsonl",
            "\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        )
        .unwrap();
        let Calibration::Conversations(c) = c else {
            panic!("conversations expected")
        };
        assert_eq!((c.len(), c[0].line), (1, 2));
        let e = read("m.jsonl", "{\"text\": \"a\"}\n{\"messages\": []}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.jsonl: line 2: messages: unknown key"), "{e}");
    }

    #[test]
    fn text_files_are_one_text() {
        assert_eq!(
            read("a.txt", "abc").unwrap(),
            Calibration::Text("abc".into())
        );
        assert!(read("e.txt", " \n")
            .unwrap_err()
            .to_string()
            .ends_with("text: the file is empty"));
    }

    #[test]
    fn a_bad_line_names_file_line_and_key() {
        for (body, want) in [
            (
                "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n",
                "b.jsonl: line 2: txt: unknown key",
            ),
            ("{\"text\": 3}\n", "b.jsonl: line 1: text: is not a string"),
            ("{\"text\": \"a\"\n", "b.jsonl: line 1: json: "),
            (
                "{\"text\": \"a\", \"images\": [1]}\n",
                "b.jsonl: line 1: images: ",
            ),
        ] {
            let e = read("b.jsonl", body).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{e}");
        }
    }
}
