//! Mutations of real input files for the loader fuzz tests, and the check
//! every mutated case must pass: a value or an error naming the file, no
//! panic, no hang.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::Value;

pub mod files;
mod regressions;

/// Cases per property: `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Values a size, count, offset or dimension field is set to.
pub const HUGE: [u64; 8] = [
    0,
    1,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// One edit of a file's bytes.
#[derive(Debug, Clone)]
pub enum Edit {
    /// XOR one byte with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite 4 or 8 bytes with a little-endian value of [`HUGE`].
    Size(usize, usize, bool),
    /// Cut the file at a position.
    Truncate(usize),
    /// Insert bytes at a position.
    Insert(usize, Vec<u8>),
    /// Delete up to 16 bytes at a position.
    Delete(usize, usize),
    /// Copy up to 64 bytes from one position to another (duplicates).
    Duplicate(usize, usize, usize),
}

/// Edits whose positions are fractions (in 1/65536) of the target region.
pub fn edits() -> impl Strategy<Value = Vec<(Edit, bool)>> {
    let pos = 0usize..65536;
    let edit = prop_oneof![
        (pos.clone(), 1u8..=255).prop_map(|(p, m)| Edit::Flip(p, m)),
        (pos.clone(), 0..HUGE.len(), any::<bool>()).prop_map(|(p, h, w)| Edit::Size(p, h, w)),
        pos.clone().prop_map(Edit::Truncate),
        (pos.clone(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(p, b)| Edit::Insert(p, b)),
        (pos.clone(), 1usize..16).prop_map(|(p, n)| Edit::Delete(p, n)),
        (pos.clone(), pos, 1usize..64).prop_map(|(a, b, n)| Edit::Duplicate(a, b, n)),
    ];
    // `true`: aimed at the header region (where the sizes and names are).
    prop::collection::vec((edit, any::<bool>()), 1..5)
}

/// Applies `edits` to `bytes`; header-aimed edits fall in `..header`.
pub fn mutate(bytes: &[u8], header: usize, edits: &[(Edit, bool)]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for (edit, aimed) in edits {
        let span = if *aimed { header.min(b.len()) } else { b.len() };
        let at = |f: usize| if span == 0 { 0 } else { f * span / 65536 };
        match edit {
            Edit::Flip(p, m) => {
                if let Some(x) = b.get_mut(at(*p)) {
                    *x ^= m;
                }
            }
            Edit::Size(p, h, wide) => {
                let v = HUGE[*h];
                let bytes: Vec<u8> = if *wide {
                    v.to_le_bytes().to_vec()
                } else {
                    (v as u32).to_le_bytes().to_vec()
                };
                let start = at(*p);
                for (k, x) in bytes.into_iter().enumerate() {
                    if let Some(y) = b.get_mut(start + k) {
                        *y = x;
                    }
                }
            }
            Edit::Truncate(p) => b.truncate(at(*p)),
            Edit::Insert(p, ins) => {
                let p = at(*p).min(b.len());
                b.splice(p..p, ins.iter().copied());
            }
            Edit::Delete(p, n) => {
                let p = at(*p).min(b.len());
                let end = (p + n).min(b.len());
                b.drain(p..end);
            }
            Edit::Duplicate(from, to, n) => {
                let from = at(*from).min(b.len());
                let chunk: Vec<u8> = b[from..(from + n).min(b.len())].to_vec();
                let to = at(*to).min(b.len());
                b.splice(to..to, chunk);
            }
        }
    }
    b
}

/// Replacement values for a JSON node: wrong types, sizes out of range.
pub fn json_values() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0..HUGE.len()).prop_map(|h| Value::from(HUGE[h])),
        Just(Value::from(-1)),
        Just(Value::from(1e300)),
        Just(Value::from(0.5)),
        Just(Value::Null),
        Just(Value::from("")),
        Just(Value::from("F8_E4M3")),
        Just(Value::Array(vec![])),
        Just(serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9])),
        Just(serde_json::json!({})),
    ]
}

/// Replaces the `k`-th node (in pre-order, modulo the node count) of `v`.
pub fn replace_node(v: &mut Value, k: usize, with: Value) {
    fn count(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(count).sum(),
            Value::Object(o) => o.values().map(count).sum(),
            _ => 0,
        }
    }
    fn walk(v: &mut Value, k: &mut usize, with: &mut Option<Value>) {
        if *k == 0 {
            if let Some(w) = with.take() {
                *v = w;
            }
            return;
        }
        *k -= 1;
        match v {
            Value::Array(a) => a.iter_mut().for_each(|c| walk(c, k, with)),
            Value::Object(o) => o.values_mut().for_each(|c| walk(c, k, with)),
            _ => {}
        }
    }
    let mut k = k % count(v);
    walk(v, &mut k, &mut Some(with));
}

/// Structural edits of a JSON document: node replacements, then the
/// text with one member duplicated (JSON allows a key twice; readers must
/// not trust either copy blindly).
pub fn mutate_json(
    text: &str,
    replacements: &[(usize, Value)],
    duplicate: Option<usize>,
) -> Vec<u8> {
    let mut v: Value = serde_json::from_str(text).expect("the fixture is JSON");
    for (k, with) in replacements {
        replace_node(&mut v, *k, with.clone());
    }
    let mut out = serde_json::to_string(&v).expect("JSON");
    if let (Some(k), Value::Object(o)) = (duplicate, &v) {
        if let Some((key, val)) = o.iter().nth(k % o.len().max(1)) {
            let member = format!("{}:{},", Value::from(key.as_str()), val);
            out.insert_str(1, &member);
        }
    }
    out.into_bytes()
}

/// Upper bound of one call on a mutated input (debug build, shared
/// 2-core machine): the unmutated fixtures load in milliseconds, so a
/// case this slow is a hang (a loop driven by a corrupted count).
const SLOW: Duration = Duration::from_secs(20);

/// Runs `f` on a mutated input: a panic fails the property, and so does an
/// error that does not name `file` (the file name, or a directory it lies in).
pub fn check<T, E: std::fmt::Display>(
    file: &Path,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let out = catch_unwind(AssertUnwindSafe(f));
    let took = t0.elapsed();
    prop_assert!(took < SLOW, "{} took {took:?}", file.display());
    match out {
        Err(_) => Err(TestCaseError::fail(format!(
            "panic on a mutated {}",
            file.display()
        ))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let msg = e.to_string();
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            let dir = file
                .parent()
                .and_then(Path::file_name)
                .unwrap_or_default()
                .to_string_lossy();
            prop_assert!(
                msg.contains(name.as_ref()) || msg.contains(dir.as_ref()),
                "the error does not name {}: {msg}",
                file.display()
            );
            Ok(())
        }
    }
}

/// A fresh directory for one case, removed when the case ends.
pub struct CaseDir(PathBuf);

impl std::ops::Deref for CaseDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for CaseDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for one case of the property `name`.
pub fn case_dir(name: &str) -> CaseDir {
    let d = std::env::temp_dir().join(format!("vlmq-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    CaseDir(d)
}
