//! Killed at any point, resumed exactly (issue 25): `vlmq quantize` runs as
//! a child process with a state directory and is killed with SIGKILL at
//! chosen points (the importance pass, mid-capture, mid-solve, half-way
//! through a state file, half-way through the checkpoint, right after the
//! checkpoint's swap); then the same command reruns to completion.
//!
//! The child pauses at the point named by the test-only variable
//! `VLMQ_TEST_KILL_AT=<point>:<n>` (see the core's `kill_point` module) and
//! says so on stderr; the parent then kills it with a real SIGKILL. After
//! every kill the output directory must be absent or a complete checkpoint
//! (never a partial one), and the final checkpoint must equal an
//! uninterrupted run's byte for byte, with the run resuming after as many
//! blocks as the state held.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fixture, s, scratch, write_text, SMALL};

/// The SIGKILL signal number.
const SIGKILL: i32 = 9;

/// One method's runs: the scratch directory and the command line.
struct Runs {
    dir: PathBuf,
    calib: PathBuf,
    method: &'static str,
}

impl Runs {
    fn new(method: &'static str) -> Runs {
        let dir = scratch(&format!("kill-{}", method.replace('+', "-")));
        let calib = write_text(&dir);
        Runs { dir, calib, method }
    }

    fn command(&self, out: &Path, state: &Path) -> Command {
        let model = fixture();
        let mut c = Command::new(env!("CARGO_BIN_EXE_vlmq"));
        c.args(["quantize", s(&model), "--out", s(out), "--calib"])
            .arg(&self.calib)
            .args(["--method", self.method, "--group", "32", "--state-dir"])
            .arg(state)
            .args(SMALL)
            .env_remove("VLMQ_TEST_KILL_AT");
        c
    }

    /// Runs to completion; returns stderr.
    fn complete(&self, out: &Path, state: &Path) -> String {
        let o = self
            .command(out, state)
            .output()
            .expect("the vlmq binary runs");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{}: {err}", self.method);
        err
    }

    /// Runs until the child reaches `point` (`<name>:<n>`), then kills it
    /// with SIGKILL. Fails when the run ends without reaching the point.
    fn kill_at(&self, out: &Path, state: &Path, point: &str) {
        let mut child = self
            .command(out, state)
            .env("VLMQ_TEST_KILL_AT", point)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the vlmq binary starts");
        let marker = format!("vlmq test kill point {point} reached");
        let mut seen = String::new();
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let reached = loop {
            match lines.next() {
                Some(Ok(line)) if line == marker => break true,
                Some(Ok(line)) => seen.push_str(&line),
                Some(Err(_)) | None => break false,
            }
        };
        // The child sleeps at the point (or has exited): a real SIGKILL.
        let _ = child.kill();
        let status = child.wait().expect("the child is reaped");
        assert!(
            reached,
            "{}: kill point {point} not reached: {seen}",
            self.method
        );
        assert_eq!(status.signal(), Some(SIGKILL), "{}: {point}", self.method);
    }
}

/// Every entry of `dir` (hidden ones included) with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// A killed run leaves no checkpoint or a complete one, never a part.
fn assert_absent_or_complete(out: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    if out.exists() {
        let got = files(out);
        let names: Vec<&String> = got.keys().collect();
        assert!(
            &got == reference,
            "{what}: the output directory holds a partial checkpoint: {names:?}"
        );
    }
}

/// Kills a run at each point of `kills` in turn (each kill in a rerun of the
/// previous one), then reruns to completion and compares with `reference`.
/// `resumed` is how many blocks the final run must restore from the state.
fn scenario(runs: &Runs, kills: &[&str], resumed: usize, reference: &BTreeMap<String, Vec<u8>>) {
    let tag = kills.join("+").replace(':', "_");
    let what = format!("{} killed at {}", runs.method, kills.join(" then "));
    let out = runs.dir.join(format!("out-{tag}"));
    let state = runs.dir.join(format!("state-{tag}"));
    for point in kills {
        runs.kill_at(&out, &state, point);
        assert_absent_or_complete(&out, reference, &what);
    }
    let err = runs.complete(&out, &state);
    let said = format!("(resumed after {resumed} blocks");
    if resumed == 0 {
        assert!(!err.contains("(resumed after"), "{what}: {err}");
    } else {
        assert!(err.contains(&said), "{what}: expected {said:?} in {err}");
    }
    assert!(
        &files(&out) == reference,
        "{what}: the resumed checkpoint differs from the uninterrupted run's"
    );
}

/// The points common to every method, on the 2-block fixture with 4
/// samples (one capture chunk per pass), true-sequential capture (4 passes
/// and 7 layers per block). State-file writes of a run, in order: the
/// manifest at open (1), then per block its tensors, its reports and the
/// manifest (2-4 for block 0, 5-7 for block 1). The checkpoint's files:
/// model.safetensors, quantize_config.json, config.json, tokenizer.json.
const COMMON: &[(&[&str], usize)] = &[
    (&["capture:2"], 0),
    (&["capture:7"], 1),
    (&["solve:3"], 0),
    (&["solve:12"], 1),
    // Half of block 0's tensors, block 0's reports complete but not
    // renamed, half of the manifest that records block 0.
    (&["file-half:2"], 0),
    (&["file-written:3"], 0),
    (&["file-half:4"], 0),
    // The manifest that records block 1, half written.
    (&["file-half:7"], 1),
    // Half of model.safetensors, config.json complete, tokenizer.json half.
    (&["dir-half:1"], 2),
    (&["dir-after:3"], 2),
    (&["dir-half:4"], 2),
    // Right after the final swap (before the parent directory is flushed);
    // the rerun then replaces a complete checkpoint and is killed with the
    // old one moved aside and the new one not yet in place.
    (&["dir-swapped:1"], 2),
    (&["dir-swapped:1", "dir-moved-aside:1"], 2),
    // ... or with the new one in place and flushed, the old one not yet removed.
    (&["dir-swapped:1", "dir-removing-old:1"], 2),
    // A second kill in the resumed run.
    (&["capture:6", "solve:5"], 1),
];

fn kill_everywhere(method: &'static str, extra: &[(&[&str], usize)]) {
    let runs = Runs::new(method);
    let straight = runs.dir.join("straight");
    runs.complete(&straight, &runs.dir.join("state-straight"));
    let reference = files(&straight);
    assert!(reference.contains_key("tokenizer.json"), "{reference:?}");
    for (kills, resumed) in COMMON.iter().chain(extra) {
        scenario(&runs, kills, *resumed, &reference);
    }
    let _ = std::fs::remove_dir_all(&runs.dir);
}

#[test]
fn gptq_killed_anywhere_resumes_to_the_same_bytes() {
    kill_everywhere("gptq", &[]);
}

/// VLMQ adds the task-loss importance pass (one backward step per block,
/// last block first), rerun in full by every resumed run.
#[test]
fn vlmq_killed_anywhere_resumes_to_the_same_bytes() {
    kill_everywhere(
        "vlmq",
        &[
            (&["importance:1"], 0),
            (&["importance:2"], 0),
            (&["capture:5", "importance:2"], 1),
        ],
    );
}
