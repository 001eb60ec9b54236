//! `vlmq quantize --format gguf:*` on the tiny Llama fixture: the file is a
//! GGUF that `vlmq eval` (candle's GGUF reader) runs, and the combinations
//! GGUF cannot store are one-line errors naming the field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vlmq-candle/tests/fixtures/hf-tiny/llama")
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vlmq-cli-gguf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vlmq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmq"))
        .args(args)
        .output()
        .expect("the vlmq binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn quantize_to_gguf_q4_0_writes_a_file_candle_runs() {
    let d = scratch();
    let calib = d.join("calib.txt");
    std::fs::write(
        &calib,
        "every token counts when weights are rounded. ".repeat(200),
    )
    .unwrap();
    let out = d.join("tiny-q4_0.gguf");
    let model = fixture();
    let base = [
        "quantize",
        s(&model),
        "--out",
        s(&out),
        "--calib",
        s(&calib),
        "--samples",
        "4",
        "--seq-len",
        "32",
    ];
    let o = vlmq(&[&base[..], &["--format", "gguf:q4_0"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");
    let o = vlmq(&[
        "eval",
        s(&out),
        "--data",
        s(&calib),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--reference",
        s(&model),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(&out).unwrap();

    for (extra, field) in [
        (&["--format", "gguf:q4_0", "--act-order"][..], "act_order"),
        (&["--format", "gguf:q4_0", "--gar"][..], "act_group_aware"),
        (&["--format", "gguf:q3_k"][..], "format"),
    ] {
        let o = vlmq(&[&base[..], extra].concat());
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("command line") && e.contains(field), "{e}");
    }
    assert!(!out.exists(), "no refused run writes output");
}
