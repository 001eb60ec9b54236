//! Prompts from the model's own chat template, rendered with `minijinja`
//! the way transformers renders them with Jinja2, plus where each message
//! lands in the text so tokens can be tagged vision / text / answer.
//!
//! Where the template comes from (first found): `chat_template.jinja`,
//! `chat_template.json` (`{"chat_template": ...}`), the `chat_template`
//! field of `processor_config.json`, then of `tokenizer_config.json` (a
//! string, or a list of `{name, template}` of which `default` is used).
//!
//! The environment matches transformers': `trim_blocks` and `lstrip_blocks`
//! on, loop controls (`break` / `continue`), Python string and dict methods
//! (`.strip()`, `.items()`, ...), `raise_exception(msg)` failing the render,
//! and the tokenizer's `bos_token` / `eos_token` / `pad_token` / `unk_token`
//! in the context.
//!
//! Message spans come from rendering growing prefixes of the conversation:
//! message `i` covers the text the rendering gains when message `i` is
//! added, and an assistant message's *content* starts where the rendering
//! of the messages before it with `add_generation_prompt` ends (so the
//! `Assistant:` header is prompt, not answer). A template whose prefix
//! renderings are not prefixes of the whole cannot be split this way and is
//! reported as [`Error::Unsupported`].

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde_json::Value;
use vlmq::{Error, Result};

use super::conversation::{template_messages, Message};

/// The name the template is registered under.
const NAME: &str = "chat_template";

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Value,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

/// Where one message lies in a rendered conversation (byte offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpan {
    /// The message's role.
    pub role: String,
    /// Start of the text the message adds (its header included).
    pub start: usize,
    /// Start of its content: after the generation prompt for an assistant
    /// message, `start` otherwise.
    pub content_start: usize,
    /// End of the text the message adds.
    pub end: usize,
}

/// A rendered conversation with the span of each message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    /// The prompt text.
    pub text: String,
    /// One span per message, in order.
    pub spans: Vec<MessageSpan>,
}

/// What a token is, for VLMQ's statistics and the answer-only task loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    /// An image token (its embedding comes from the vision tower).
    Vision,
    /// Prompt text (system, user, role headers, markup).
    Text,
    /// The content of an assistant message.
    Answer,
}

impl ChatTemplate {
    /// Compiles a template source; `special_tokens` is a JSON object of the
    /// names (`bos_token`, ...) the template may read.
    pub fn new(source: String, special_tokens: Value) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error("syntax", &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<JinjaValue, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source)
            .map_err(|e| template_error("compile", &e))?;
        Ok(ChatTemplate {
            env,
            special_tokens,
        })
    }

    /// Finds and compiles the template of a model directory (see the module
    /// doc for the search order), with the special tokens of its
    /// `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let tokenizer_config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let token = tokenizer_config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(Value::as_str))
                        .map(str::to_string)
                });
            if let Some(t) = token {
                special.insert(key.to_string(), Value::String(t));
            }
        }
        let source = find_template(dir, tokenizer_config.as_ref())?;
        Self::new(source, Value::Object(special))
    }

    /// Renders `messages` to the prompt text.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.special_tokens.clone();
        if let Value::Object(map) = &mut ctx {
            map.insert("messages".into(), template_messages(messages));
            map.insert(
                "add_generation_prompt".into(),
                Value::Bool(add_generation_prompt),
            );
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error("lookup", &e))?;
        tmpl.render(JinjaValue::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| template_error("render", &e))
    }

    /// Renders the whole conversation (no generation prompt) with the span
    /// of each message.
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<RenderedChat> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::with_capacity(messages.len());
        let mut start = self.prefix_len(&text, &messages[..0], false)?;
        for (i, m) in messages.iter().enumerate() {
            let end = self.prefix_len(&text, &messages[..=i], false)?;
            let content_start = if m.role == "assistant" {
                self.prefix_len(&text, &messages[..i], true)?
                    .clamp(start, end)
            } else {
                start
            };
            spans.push(MessageSpan {
                role: m.role.clone(),
                start,
                content_start,
                end,
            });
            start = end;
        }
        Ok(RenderedChat { text, spans })
    }

    /// Length of the rendering of `prefix`, which must be a prefix of `full`.
    fn prefix_len(&self, full: &str, prefix: &[Message], generation: bool) -> Result<usize> {
        let part = self.render(prefix, generation)?;
        if full.starts_with(&part) {
            Ok(part.len())
        } else {
            Err(Error::Unsupported {
                what: format!(
                    "a chat template whose rendering of the first {} message(s) is not a prefix of \
                     the whole conversation's",
                    prefix.len()
                ),
                remedy: "use a template that renders messages in order (as chat templates for \
                         training do), or pass prompts already rendered"
                    .into(),
            })
        }
    }
}

impl RenderedChat {
    /// Replaces the `k`-th occurrence of `placeholder` with `replacements[k]`
    /// (e.g. one `<image>` per image with its expanded token string), moving
    /// the spans with the text. The counts must agree.
    pub fn expand(&self, placeholder: &str, replacements: &[String]) -> Result<RenderedChat> {
        let found: Vec<usize> = self
            .text
            .match_indices(placeholder)
            .map(|(i, _)| i)
            .collect();
        if found.len() != replacements.len() || placeholder.is_empty() {
            return Err(Error::ShapeMismatch {
                what: format!("occurrences of {placeholder:?} in the prompt vs images"),
                expected: vec![replacements.len()],
                actual: vec![found.len()],
            });
        }
        let mut text = String::with_capacity(self.text.len());
        let mut last = 0;
        for (&at, rep) in found.iter().zip(replacements) {
            text.push_str(&self.text[last..at]);
            text.push_str(rep);
            last = at + placeholder.len();
        }
        text.push_str(&self.text[last..]);
        // An offset moves by the growth of every placeholder that ends at or
        // before it.
        let shift = |pos: usize| -> usize {
            found
                .iter()
                .zip(replacements)
                .filter(|(&at, _)| at + placeholder.len() <= pos)
                .map(|(_, rep)| rep.len() as isize - placeholder.len() as isize)
                .sum::<isize>()
                .wrapping_add_unsigned(pos) as usize
        };
        let spans = self
            .spans
            .iter()
            .map(|s| MessageSpan {
                role: s.role.clone(),
                start: shift(s.start),
                content_start: shift(s.content_start),
                end: shift(s.end),
            })
            .collect();
        Ok(RenderedChat { text, spans })
    }

    /// The role of each token given its byte offsets in [`text`](Self::text)
    /// and its id: `image_token` ids are vision, tokens starting inside an
    /// assistant message's content are answer, the rest text.
    pub fn token_roles(
        &self,
        ids: &[u32],
        offsets: &[(usize, usize)],
        image_token: u32,
    ) -> Vec<TokenRole> {
        ids.iter()
            .zip(offsets)
            .map(|(&id, &(start, _))| {
                if id == image_token {
                    TokenRole::Vision
                } else if self
                    .spans
                    .iter()
                    .any(|s| s.role == "assistant" && (s.content_start..s.end).contains(&start))
                {
                    TokenRole::Answer
                } else {
                    TokenRole::Text
                }
            })
            .collect()
    }
}

/// The template source of a model directory.
fn find_template(dir: &Path, tokenizer_config: Option<&Value>) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
            path: jinja,
            source,
        });
    }
    for file in ["chat_template.json", "processor_config.json"] {
        let path = dir.join(file);
        if let Some(v) = read_json_if_exists(&path)? {
            if let Some(t) = v.get("chat_template") {
                return template_field(t, &path);
            }
        }
    }
    if let Some(t) = tokenizer_config.and_then(|c| c.get("chat_template")) {
        return template_field(t, &dir.join("tokenizer_config.json"));
    }
    Err(Error::Unsupported {
        what: format!(
            "a model directory without a chat template ({})",
            dir.display()
        ),
        remedy: "add chat_template.jinja, or a chat_template field to tokenizer_config.json".into(),
    })
}

/// A `chat_template` field: a string or a list of `{name, template}`.
fn template_field(v: &Value, path: &Path) -> Result<String> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    let named = v.as_array().and_then(|list| {
        list.iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
    });
    named.map(str::to_string).ok_or_else(|| Error::Json {
        path: path.to_path_buf(),
        reason: "chat_template is neither a string nor a list with a \"default\" entry".into(),
    })
}

/// A JSON file, `None` when it does not exist.
fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// A minijinja failure as an error naming the stage.
fn template_error(stage: &str, e: &minijinja::Error) -> Error {
    Error::Unencodable {
        what: format!("chat template ({stage})"),
        reason: format!("{e:#}"),
    }
}
