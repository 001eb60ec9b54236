//! One writer per state and output directory, across processes: the test
//! binary re-executes itself (`current_exe`) to get a second process, which
//! runs one of the `child_*` functions below selected by an environment
//! variable (they do nothing in a normal test run).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::tiny::{samples, TinyModel};
use vlmq::lock::DirLock;
use vlmq::pipeline::{quantize_model, PipelineConfig, QuantMethod};
use vlmq::{Bits, Checkpoint, CheckpointWriter, Error, GptqConfig, QuantScheme};

const ROLE: &str = "VLMQ_LOCK_TEST_ROLE";
const DIR: &str = "VLMQ_LOCK_TEST_DIR";

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vlmq-lock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs this test binary as a child in `role` on `dir`, stdout piped.
fn spawn(role: &str, test: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The child's first stdout line that contains `prefix`, from it on (the
/// child keeps running). For one line only: the reader is dropped with
/// whatever it buffered beyond that line.
fn line_with(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        // libtest may print `test NAME ... ` before the test's own first line.
        if let Some(at) = line.find(prefix) {
            return line[at..].to_string();
        }
    }
    panic!("the child printed no line starting with {prefix}");
}

/// Every stdout line of the finished child that contains `prefix`, from it on.
fn lines_with(child: Child, prefix: &str) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.find(prefix).map(|at| line[at..].to_string()))
        .collect()
}

fn role() -> Option<(String, PathBuf)> {
    Some((std::env::var(ROLE).ok()?, std::env::var(DIR).ok()?.into()))
}

/// Child: locks the state directory, says so, then holds it until killed
/// (`hold`) or dies at once without releasing anything (`die`).
#[test]
fn child_holds_the_lock() {
    let Some((role, dir)) = role() else { return };
    let lock = match role.as_str() {
        "hold-output" => DirLock::output_dir(&dir).unwrap(),
        _ => DirLock::state_dir(&dir).unwrap(),
    };
    println!("HELD pid={}", std::process::id());
    match role.as_str() {
        "die" => std::process::abort(),
        _ => {
            std::thread::sleep(std::time::Duration::from_secs(60));
            drop(lock);
        }
    }
}

/// Child: tries the locks of a state and an output directory and reports.
#[test]
fn child_tries_the_lock() {
    let Some((_, dir)) = role() else { return };
    for (what, r) in [
        ("state", DirLock::state_dir(&dir.join("state"))),
        ("output", DirLock::output_dir(&dir.join("out"))),
    ] {
        match r {
            Err(e @ Error::Locked { .. }) => println!("RESULT {what} locked: {e}"),
            Err(e) => println!("RESULT {what} other error: {e}"),
            Ok(_) => println!("RESULT {what} acquired"),
        }
    }
}

#[test]
fn a_second_process_is_refused_with_the_holders_pid() {
    let dir = temp("second");
    let _state = DirLock::state_dir(&dir.join("state")).unwrap();
    let _out = DirLock::output_dir(&dir.join("out")).unwrap();
    let me = format!("pid={}", std::process::id());
    let lines = lines_with(spawn("try", "child_tries_the_lock", &dir), "RESULT");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, what) in lines.iter().zip(["state", "output"]) {
        assert!(line.starts_with(&format!("RESULT {what} locked")), "{line}");
        assert!(line.contains(&me), "{line}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_released_lock_can_be_taken_by_the_next_process() {
    let dir = temp("released");
    drop(DirLock::state_dir(&dir.join("state")).unwrap());
    drop(DirLock::output_dir(&dir.join("out")).unwrap());
    let lines = lines_with(spawn("try", "child_tries_the_lock", &dir), "RESULT");
    assert_eq!(lines, ["RESULT state acquired", "RESULT output acquired"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stale_lock_of_a_dead_process_is_taken_over() {
    let dir = temp("stale");
    let mut child = spawn("die", "child_holds_the_lock", &dir);
    let held = line_with(&mut child, "HELD");
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the child must have died holding the lock"
    );
    // The dead child's record is still in the file.
    let record = std::fs::read_to_string(dir.join(vlmq::lock::STATE_LOCK_FILE)).unwrap();
    let pid = held.trim_start_matches("HELD ");
    assert!(record.contains(pid), "{record}");
    let lock = DirLock::state_dir(&dir).unwrap();
    let previous = lock
        .previous_holder()
        .expect("the stale holder is reported");
    assert!(previous.contains(pid), "{previous}");
    drop(lock);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_and_a_checkpoint_write_refuse_a_directory_another_process_holds() {
    let dir = temp("run");
    let state = dir.join("state");
    let mut child = spawn("hold", "child_holds_the_lock", &state);
    let held = line_with(&mut child, "HELD");
    let pid = held.trim_start_matches("HELD ").to_string();
    let scheme = QuantScheme::new(Bits::new(4).unwrap());
    let cfg =
        PipelineConfig::new(QuantMethod::Gptq, GptqConfig::new(scheme)).with_state_dir(&state);
    let mut model = TinyModel::new(2, 16, 24, 2);
    let err = quantize_model(&mut model, &samples(1, 2, 16), &cfg, |_| {}).unwrap_err();
    child.kill().unwrap();
    child.wait().unwrap();
    match err.root() {
        Error::Locked { holder, .. } => assert!(holder.contains(&pid), "{err}"),
        other => panic!("expected Locked, got {other}"),
    }
    // Once the holder is gone, the run goes through.
    let out = quantize_model(&mut model, &samples(1, 2, 16), &cfg, |_| {}).unwrap();

    // The checkpoint writer locks its output directory the same way, and
    // leaves a directory it may not write untouched.
    let ck = dir.join("ck");
    let mut writer = CheckpointWriter::new();
    for ((b, name), qw) in &out.weights {
        writer
            .add_layer(&format!("tiny.{b}.{name}"), qw.clone(), None)
            .unwrap();
    }
    let mut child = spawn("hold-output", "child_holds_the_lock", &ck);
    let held = line_with(&mut child, "HELD");
    let pid = held.trim_start_matches("HELD ").to_string();
    let err = writer.write(&ck).unwrap_err();
    child.kill().unwrap();
    child.wait().unwrap();
    match &err {
        Error::Locked { holder, .. } => assert!(holder.contains(&pid), "{err}"),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(!ck.exists());
    writer.write(&ck).unwrap();
    assert!(Checkpoint::open(&ck).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_spellings_of_one_directory_share_the_lock_in_one_process() {
    let dir = temp("spellings");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let plain = DirLock::output_dir(&dir.join("out")).unwrap();
    // The same directory reached through `sub/..`: one lock, not a refusal.
    let other = DirLock::output_dir(&dir.join("sub").join("..").join("out")).unwrap();
    drop((plain, other));
    let state = DirLock::state_dir(&dir.join("state")).unwrap();
    let again = DirLock::state_dir(&dir.join("sub/../state")).unwrap();
    drop((state, again));
    std::fs::remove_dir_all(&dir).unwrap();
}
