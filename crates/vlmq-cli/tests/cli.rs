//! Runs the `vlmq` binary on the tiny Llama and LLaVA fixtures of vlmq-candle.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixture, s, scratch, write_text, SMALL};

fn vlmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmq"))
        .args(args)
        .output()
        .expect("the vlmq binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn quantize_with_a_recipe_then_inspect_and_eval() {
    let d = scratch("recipe");
    let calib = write_text(&d);
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        "bits = 4\ngroup_size = 32\ndense = [\"mlp.down_proj\"]\n",
    )
    .unwrap();
    let out = d.join("out");
    let model = fixture();
    let mut args = vec![
        "quantize",
        s(&model),
        "--out",
        s(&out),
        "--calib",
        s(&calib),
    ];
    args.extend(["--recipe", s(&recipe)]);
    args.extend(SMALL);
    let o = vlmq(&args);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = vlmq(&["inspect", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        "format       gptq\n",
        "bits         4\n",
        "group size   32\n",
        "symmetric    true\n",
        // 2 blocks x 7 linears, the down projections left dense.
        "quantized    12 layers\n",
        "  model.layers.0.mlp.down_proj.weight [64, 176]\n",
        "digests      every tensor matches its stored digest\n",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }

    let fp = fixture();
    let o = vlmq(&[
        "eval",
        s(&out),
        "--data",
        s(&calib),
        "--reference",
        s(&fp),
        "--seq-len",
        "32",
        "--windows",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    assert!(
        line.starts_with("perplexity ") && line.contains(" kl "),
        "{line}"
    );
    // The quantized model differs from full precision: KL is positive.
    let kl: f64 = line
        .split(" kl ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kl > 0.0, "{line}");
}

#[test]
fn a_cancelled_run_resumes_to_the_same_bytes() {
    let d = scratch("resume");
    let calib = write_text(&d);
    let model = fixture();
    let run = |out: &Path, state: &Path, stop: Option<&str>| {
        let mut a = vec!["quantize", s(&model), "--out", s(out), "--calib", s(&calib)];
        a.extend(["--group", "32", "--state-dir", s(state)]);
        a.extend(SMALL);
        if let Some(n) = stop {
            a.extend(["--stop-after-layers", n]);
        }
        vlmq(&a)
    };
    let straight = run(&d.join("a"), &d.join("sa"), None);
    assert!(straight.status.success(), "{}", stderr(&straight));

    // Block 0 has 7 linears: stopping after 9 leaves block 0 in the state.
    let cut = run(&d.join("b"), &d.join("sb"), Some("9"));
    assert_eq!(cut.status.code(), Some(130), "{}", stderr(&cut));
    assert!(stderr(&cut).contains("cancelled"));
    assert!(
        !d.join("b").exists(),
        "a cancelled run writes no checkpoint"
    );
    assert!(std::fs::read_dir(d.join("sb")).unwrap().count() > 0);

    let resumed = run(&d.join("b"), &d.join("sb"), None);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let a = std::fs::read(d.join("a/model.safetensors")).unwrap();
    let b = std::fs::read(d.join("b/model.safetensors")).unwrap();
    assert!(a == b, "resumed checkpoint differs from the straight run");
}

/// Exit code 1 and one line on stderr that names the file and the field.
fn assert_one_line_error(o: &Output, file: &str, field: &str) {
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("error: ") && e.contains(file) && e.contains(field),
        "{e}"
    );
}

#[test]
fn bad_inputs_give_one_line_naming_file_and_field() {
    let d = scratch("errors");
    let calib = write_text(&d);
    let model = fixture();
    let out = d.join("out");

    let recipe = d.join("bad.toml");
    std::fs::write(&recipe, "method = \"gptq\"\nbits = \"four\"\n").unwrap();
    let o = vlmq(&[
        "quantize",
        s(&model),
        "--out",
        s(&out),
        "--calib",
        s(&calib),
        "--recipe",
        s(&recipe),
    ]);
    assert_one_line_error(&o, "bad.toml", "line 2: bits");

    let jsonl = d.join("calib.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"a b c\"}\n{\"text\": 7}\n").unwrap();
    let o = vlmq(&[
        "quantize",
        s(&model),
        "--out",
        s(&out),
        "--calib",
        s(&jsonl),
    ]);
    assert_one_line_error(&o, "calib.jsonl", "line 2: text");

    let empty = d.join("not-a-model");
    std::fs::create_dir_all(&empty).unwrap();
    let o = vlmq(&[
        "quantize",
        s(&empty),
        "--out",
        s(&out),
        "--calib",
        s(&calib),
    ]);
    assert_one_line_error(&o, "not-a-model", "config.json");

    let o = vlmq(&[
        "quantize",
        s(&model),
        "--out",
        s(&out),
        "--calib",
        s(&calib),
        "--dtype",
        "f8",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("dtype = f8"), "{}", stderr(&o));

    assert!(!out.exists(), "no failed run writes output");
}

#[test]
fn a_directory_another_process_writes_is_refused_naming_the_holder() {
    let d = scratch("locked");
    let calib = write_text(&d);
    let model = fixture();
    let (out, state) = (d.join("out"), d.join("state"));
    let me = format!("pid={}", std::process::id());
    let run = || {
        vlmq(&[
            "quantize",
            s(&model),
            "--out",
            s(&out),
            "--calib",
            s(&calib),
            "--state-dir",
            s(&state),
        ])
    };
    // This test process is the holder; the command is a second process.
    // Both are held at first, so the command stops at the output directory
    // (taken first); then the state directory alone is held.
    for held in [
        vlmq::lock::DirLock::output_dir(&out).unwrap(),
        vlmq::lock::DirLock::state_dir(&state).unwrap(),
    ] {
        let o = run();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("locked by another vlmq process") && e.contains(&me),
            "{e}"
        );
        assert!(e.contains(s(held.path())), "{e}");
        drop(held);
    }
    assert!(!out.exists(), "a refused run writes nothing");
}

/// LLaVA-1.5's prompt format written as a chat template (the tiny LLaVA
/// fixture carries none): `USER: <image>\n... ASSISTANT: ...`.
const LLAVA_TEMPLATE: &str = "{% for m in messages %}\
{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}\
{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} \
{% endfor %}";

/// The tiny LLaVA fixture with a chat template, and two images beside a
/// calibration file of conversations.
fn llava_with_template(d: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vlmq-candle/tests/fixtures");
    let model = d.join("llava");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(src.join("hf-tiny/llava")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(model.join("chat_template.jinja"), LLAVA_TEMPLATE).unwrap();
    for n in 0..2 {
        let img = format!("image_{n}.png");
        std::fs::copy(src.join("hf-tiny-vlm/qwen2_vl").join(&img), d.join(&img)).unwrap();
    }
    model
}

/// One conversation line: a user turn (with `image` as its first part when
/// given) and the assistant's answer.
fn conversation(image: Option<&str>, question: &str, answer: &str) -> String {
    let mut parts = Vec::new();
    if let Some(i) = image {
        parts.push(format!("{{\"type\": \"image\", \"path\": \"{i}\"}}"));
    }
    parts.push(format!("{{\"type\": \"text\", \"text\": \"{question}\"}}"));
    format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": [{}]}}, \
         {{\"role\": \"assistant\", \"content\": \"{answer}\"}}]}}\n",
        parts.join(", ")
    )
}

#[test]
fn a_vlm_quantizes_on_conversations_with_images() {
    let d = scratch("conversations");
    let model = llava_with_template(&d);
    let calib = d.join("chat.jsonl");
    let lines = [
        conversation(Some("image_0.png"), "What is shown?", "A red square."),
        conversation(None, "Name a colour.", "Blue."),
        conversation(Some("image_1.png"), "Describe the shapes.", "Two bars."),
        conversation(Some("image_0.png"), "Is it dark?", "No, it is bright."),
    ];
    std::fs::write(&calib, lines.concat()).unwrap();
    let out = d.join("out");
    let o = vlmq(&[
        "quantize",
        s(&model),
        "--out",
        s(&out),
        "--calib",
        s(&calib),
        "--group",
        "32",
        "--samples",
        "4",
        "--seq-len",
        "64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vlmq(&["inspect", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A conversation whose second message has no role: one line naming the
    // file, the line and the field; nothing written.
    let bad = d.join("bad.jsonl");
    let broken =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"content\": \"yo\"}]}\n";
    std::fs::write(&bad, format!("{}{broken}", lines[0])).unwrap();
    let out2 = d.join("out2");
    let o = vlmq(&["quantize", s(&model), "--out", s(&out2), "--calib", s(&bad)]);
    assert_one_line_error(&o, "bad.jsonl", "line 2: messages[1].role");
    assert!(!out2.exists());

    // Without a chat template, conversations are refused by name.
    std::fs::remove_file(model.join("chat_template.jinja")).unwrap();
    let o = vlmq(&[
        "quantize",
        s(&model),
        "--out",
        s(&out2),
        "--calib",
        s(&calib),
        "--samples",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("chat template"), "{}", stderr(&o));
}

/// `--capture-tokens`, `--capture-mb` and `--importance-mb` go into the recipe in effect
/// (printed as TOML), and that recipe gives the pipeline those budgets.
#[test]
fn memory_flags_reach_the_pipeline_configuration() {
    let d = scratch("memory-flags");
    let o = vlmq(&[
        "quantize",
        "model-not-read",
        "--out",
        s(&d.join("out")),
        "--calib",
        "calib-not-read",
        "--capture-tokens",
        "1000",
        "--capture-mb",
        "32",
        "--importance-mb",
        "64",
        "--print-recipe",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("capture_tokens = 1000\n"), "{text}");
    assert!(text.contains("importance_memory_mb = 64\n"), "{text}");
    assert!(text.contains("capture_memory_mb = 32\n"), "{text}");
    let r = vlmq_candle::Recipe::from_toml_str(&text, Path::new("printed")).unwrap();
    let checked = r.check(Path::new("printed")).unwrap();
    assert_eq!(checked.pipeline().capture_tokens(), 1000);
    assert_eq!(checked.pipeline().importance_memory(), 64 << 20);
    assert_eq!(checked.pipeline().capture_memory(), 32 << 20);
    let o = vlmq(&[
        "quantize",
        "m",
        "--out",
        s(&d.join("out")),
        "--calib",
        "c",
        "--importance-mb",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("importance_memory_mb"),
        "{}",
        stderr(&o)
    );
}
