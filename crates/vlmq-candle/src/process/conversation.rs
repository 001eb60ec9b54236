//! The calibration file format: JSONL, one conversation per line.
//!
//! ```text
//! {"messages":[{"role":"user","content":[{"type":"image","path":"a.png"},{"type":"text","text":"What is this?"}]},
//!              {"role":"assistant","content":[{"type":"text","text":"A cat."}]}]}
//! ```
//!
//! - `messages` is a non-empty list; each message has a string `role` and a
//!   `content` that is either a list of parts or a plain string (one text
//!   part);
//! - a part is `{"type":"text","text":...}` or `{"type":"image","path":...}`,
//!   the path relative to the JSONL file's folder (absolute paths are kept);
//! - blank lines are skipped; line numbers in errors count them.
//!
//! Every problem is an [`Error::InvalidField`] naming the file and, as its
//! field, the 1-based line and the key (`line 3: messages[0].content[1].path`;
//! `line 3: (record)` for the whole line): a line that is not
//! JSON, a missing or mistyped field, an unknown part type, an image file
//! that does not exist. [`Conversation::invalid`] builds the same error for
//! problems found later (an image the processor cannot take).

use std::path::{Path, PathBuf};

use serde_json::Value;
use vlmq::{Error, Result};

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text(String),
    /// An image file (resolved against the JSONL file's folder).
    Image(PathBuf),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `user`, `assistant`, `system`, ... (passed to the chat template as is).
    pub role: String,
    /// The parts in order.
    pub content: Vec<Part>,
}

/// One conversation (one line of the file), with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The messages in order.
    pub messages: Vec<Message>,
    /// The file it was read from.
    pub file: PathBuf,
    /// Its 1-based line number.
    pub line: usize,
}

impl Conversation {
    /// The image paths in the order they appear (the order the processor and
    /// the model consume them).
    pub fn images(&self) -> Vec<&Path> {
        self.messages
            .iter()
            .flat_map(|m| &m.content)
            .filter_map(|p| match p {
                Part::Image(path) => Some(path.as_path()),
                Part::Text(_) => None,
            })
            .collect()
    }

    /// An [`Error::InvalidField`] about `field` of this conversation.
    pub fn invalid(&self, field: &str, reason: impl std::fmt::Display) -> Error {
        record_error(&self.file, self.line, field, reason)
    }

    /// The field path of the `n`-th image (0-based, in [`images`](Self::images)
    /// order), for errors about that image.
    pub fn image_field(&self, n: usize) -> String {
        let mut seen = 0;
        for (i, m) in self.messages.iter().enumerate() {
            for (j, p) in m.content.iter().enumerate() {
                if let Part::Image(_) = p {
                    if seen == n {
                        return format!("messages[{i}].content[{j}].path");
                    }
                    seen += 1;
                }
            }
        }
        "messages".into()
    }
}

/// Reads every conversation of a JSONL calibration file, checking that each
/// image exists.
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_conversation(line, path, i + 1, base)?);
    }
    if out.is_empty() {
        return Err(Error::Empty {
            what: format!("calibration file {}", path.display()),
        });
    }
    Ok(out)
}

/// Parses one line of a calibration file (`file` and `line` for errors,
/// image paths resolved against `base`), checking that each image exists.
pub fn parse_conversation(
    text: &str,
    file: &Path,
    line: usize,
    base: &Path,
) -> Result<Conversation> {
    let bad = |field: String, reason: String| record_error(file, line, &field, reason);
    let record: Value = serde_json::from_str(text)
        .map_err(|e| bad("(record)".into(), format!("not a JSON object: {e}")))?;
    let messages = record
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages".into(), "missing or not a list".into()))?;
    if messages.is_empty() {
        return Err(bad("messages".into(), "empty list".into()));
    }
    let mut parsed = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad(
                format!("messages[{i}].role"),
                "missing or not a string".into(),
            )
        })?;
        let content = match m.get("content") {
            Some(Value::String(s)) => vec![Part::Text(s.clone())],
            Some(Value::Array(parts)) => parts
                .iter()
                .enumerate()
                .map(|(j, p)| parse_part(p, base, &format!("messages[{i}].content[{j}]")))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|(field, reason)| bad(field, reason))?,
            _ => {
                return Err(bad(
                    format!("messages[{i}].content"),
                    "missing, or neither a string nor a list of parts".into(),
                ))
            }
        };
        parsed.push(Message {
            role: role.to_string(),
            content,
        });
    }
    Ok(Conversation {
        messages: parsed,
        file: file.to_path_buf(),
        line,
    })
}

/// The error about `field` of the record on `line` of `file`.
fn record_error(file: &Path, line: usize, field: &str, reason: impl std::fmt::Display) -> Error {
    Error::field(file, format!("line {line}: {field}"), reason)
}

/// One content part; errors as (field, reason).
fn parse_part(p: &Value, base: &Path, at: &str) -> std::result::Result<Part, (String, String)> {
    let string = |key: &str| {
        p.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| (format!("{at}.{key}"), "missing or not a string".to_string()))
    };
    match string("type")? {
        "text" => Ok(Part::Text(string("text")?.to_string())),
        "image" => {
            let path = base.join(string("path")?);
            if !path.is_file() {
                return Err((
                    format!("{at}.path"),
                    format!("image file {} does not exist", path.display()),
                ));
            }
            Ok(Part::Image(path))
        }
        other => Err((
            format!("{at}.type"),
            format!("unknown part type {other:?} (expected \"text\" or \"image\")"),
        )),
    }
}

/// The messages as the JSON value chat templates expect: `role`, and
/// `content` as a list of `{"type":"text","text":...}` / `{"type":"image"}`.
pub fn template_messages(messages: &[Message]) -> Value {
    Value::Array(
        messages
            .iter()
            .map(|m| {
                let parts = m
                    .content
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => serde_json::json!({"type": "text", "text": t}),
                        Part::Image(_) => serde_json::json!({"type": "image"}),
                    })
                    .collect();
                serde_json::json!({"role": m.role, "content": Value::Array(parts)})
            })
            .collect(),
    )
}
