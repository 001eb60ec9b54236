//! Reading a [`Recipe`] from TOML, with one-line errors naming the file,
//! the line and the key.

use std::path::Path;

use vlmq::{Error, Result};

use super::Recipe;

impl Recipe {
    /// Reads a TOML recipe file (see the module docs for its keys).
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Recipe> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Recipe::from_toml_str(&text, path)
    }

    /// Parses TOML text; `origin` names the text in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Recipe> {
        toml::from_str(text).map_err(|e| {
            let (line, key) = e
                .span()
                .map(|s| locate(text, s.start))
                .unwrap_or((0, String::new()));
            let field = match (line, key.is_empty()) {
                (0, _) => "recipe".to_string(),
                (n, true) => format!("line {n}"),
                (n, false) => format!("line {n}: {key}"),
            };
            Error::field(origin, field, e.message().replace('\n', " "))
        })
    }

    /// The recipe as TOML text (every field, defaults included).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the recipe: {e}\n"))
    }
}

/// The 1-based line of byte `at` in `text` and the key written on it (the
/// text before `=`, or a `[table]` header), if any.
fn locate(text: &str, at: usize) -> (usize, String) {
    let at = at.min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    let src = text.lines().nth(line - 1).unwrap_or("").trim();
    let key = match src.split_once('=') {
        Some((k, _)) => k.trim().to_string(),
        None if src.starts_with('[') => src.to_string(),
        None => String::new(),
    };
    (line, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::OutputFormat;

    fn err(text: &str) -> String {
        Recipe::from_toml_str(text, Path::new("r.toml"))
            .and_then(|r| r.check(Path::new("r.toml")).map(|_| r))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn empty_text_is_the_default_recipe() {
        let r = Recipe::from_toml_str("", Path::new("r.toml")).unwrap();
        assert_eq!(r, Recipe::default());
    }

    /// The recipe's defaults are the library's: one set of defaults.
    #[test]
    fn the_default_recipe_is_the_default_solver() {
        let r = Recipe::default().check(Path::new("r.toml")).unwrap();
        assert_eq!(*r.pipeline().solver(), vlmq::GptqConfig::default());
        assert_eq!(r.pipeline().method(), vlmq::QuantMethod::Gptq);
        assert_eq!(r.format(), OutputFormat::Gptq);
    }

    #[test]
    fn printed_recipe_reads_back_equal() {
        let mut r = Recipe {
            bits: 3,
            blocks: Some("model.layers.".into()),
            dense: vec!["mlp.down_proj".into()],
            ..Recipe::default()
        };
        r.layers
            .insert("self_attn.q_proj".into(), Default::default());
        let back = Recipe::from_toml_str(&r.to_toml_string(), Path::new("r.toml")).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn errors_are_one_line_naming_file_line_and_key() {
        let e = err("method = \"gptq\"\nbits = \"four\"\n");
        assert!(e.starts_with("r.toml: line 2: bits: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("bitz = 4\n");
        assert!(e.starts_with("r.toml: line 1: bitz: "), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = err("[layers.\"mlp.up_proj\"]\nbits = 8\n");
        assert!(e.starts_with("r.toml: layers.\"mlp.up_proj\": "), "{e}");
    }

    #[test]
    fn checks_name_the_field() {
        assert!(err("bits = 5").starts_with("r.toml: bits: 5 is not 2, 3, 4 or 8"));
        assert!(err("group_size = -7").starts_with("r.toml: group_size: "));
        assert!(err("damping = 1.5").starts_with("r.toml: damping: "));
        assert!(err("method = \"awq\"").starts_with("r.toml: method: "));
        assert!(err("format = \"exl2\"").starts_with("r.toml: format: "));
        assert!(err("samples = 0").starts_with("r.toml: samples: "));
        assert!(err("static_groups = true").starts_with("r.toml: static_groups: "));
        assert!(err("capture_tokens = 0").starts_with("r.toml: capture_tokens: "));
        assert!(err("importance_memory_mb = 0").starts_with("r.toml: importance_memory_mb: "));
        assert!(err("capture_memory_mb = 0").starts_with("r.toml: capture_memory_mb: "));
    }

    /// The memory knobs reach the pipeline's configuration.
    #[test]
    fn memory_budgets_reach_the_pipeline() {
        let text = "capture_tokens = 1000\ncapture_memory_mb = 32\nimportance_memory_mb = 64\n";
        let r = Recipe::from_toml_str(text, Path::new("r.toml")).unwrap();
        let p = r.check(Path::new("r.toml")).unwrap().pipeline().clone();
        assert_eq!(p.capture_tokens(), 1000);
        assert_eq!(p.capture_memory(), 32 << 20);
        assert_eq!(p.importance_memory(), 64 << 20);
        let d = Recipe::default().check(Path::new("r.toml")).unwrap();
        assert_eq!(
            d.pipeline().importance_memory(),
            vlmq::PipelineConfig::DEFAULT_IMPORTANCE_MEMORY
        );
        assert_eq!(
            d.pipeline().capture_tokens(),
            vlmq::PipelineConfig::DEFAULT_CAPTURE_TOKENS
        );
        assert_eq!(
            d.pipeline().capture_memory(),
            vlmq::PipelineConfig::DEFAULT_CAPTURE_MEMORY
        );
    }
}
