//! What the `quantize`, `gguf_table` and `needle_qa` examples share: their flag reader,
//! the recipe they build from it (the `vlmq` command's recipe type), and
//! the JSON line each run ends with.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use vlmq::QuantMethod;
use vlmq_candle::Recipe;

/// `--name value` pairs and bare `--switch`es from the command line.
pub struct Flags {
    values: HashMap<String, String>,
    switches: HashSet<String>,
}

impl Flags {
    /// Reads the process arguments; a flag in neither list, or a valued
    /// flag without its value, is an error naming it.
    pub fn parse(valued: &[&str], switches: &[&str]) -> Result<Self, String> {
        let mut f = Flags {
            values: HashMap::new(),
            switches: HashSet::new(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            if switches.contains(&k.as_str()) {
                f.switches.insert(k);
            } else if valued.contains(&k.as_str()) {
                let v = it.next().ok_or(format!("{k} needs a value"))?;
                f.values.insert(k, v);
            } else {
                return Err(format!("unknown flag {k:?}"));
            }
        }
        Ok(f)
    }

    /// Whether the switch was given.
    pub fn switch(&self, k: &str) -> bool {
        self.switches.contains(k)
    }

    /// The value of `k` as a path, if given.
    pub fn path(&self, k: &str) -> Option<PathBuf> {
        self.values.get(k).map(PathBuf::from)
    }

    /// The value of `k` parsed as `T`, if given.
    pub fn parsed<T: FromStr>(&self, k: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        self.values
            .get(k)
            .map(|v| v.parse::<T>().map_err(|e| format!("{k} {v:?}: {e}")))
            .transpose()
    }

    /// The value of `k` parsed as `T`, or `default`.
    pub fn or<T: FromStr>(&self, k: &str, default: T) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        Ok(self.parsed(k)?.unwrap_or(default))
    }
}

/// The method, bit width, group size and symmetry of a run.
pub struct Quant {
    pub method: QuantMethod,
    pub bits: u32,
    pub group: usize,
    pub symmetric: bool,
    /// Group-aware activation ordering (`--gar`).
    pub gar: bool,
}

impl Quant {
    /// `--method` (default `default_method`), `--bits` (4), `--group`
    /// (128) and the `--asym` and `--gar` switches.
    pub fn from_flags(f: &Flags, default_method: QuantMethod) -> Result<Self, String> {
        Ok(Quant {
            method: f.or("--method", default_method)?,
            bits: f.or("--bits", 4)?,
            group: f.or("--group", 128)?,
            symmetric: !f.switch("--asym"),
            gar: f.switch("--gar"),
        })
    }

    /// The run's recipe, as the `vlmq` command builds it from the same
    /// flags: this method and grid, true-sequential unless `one_forward`,
    /// every other setting (calibration sizes included) at its default.
    pub fn recipe(&self, one_forward: bool) -> Recipe {
        Recipe {
            method: self.method.name().to_string(),
            bits: self.bits,
            group_size: i64::try_from(self.group).unwrap_or(i64::MAX),
            symmetric: self.symmetric,
            act_group_aware: self.gar,
            true_sequential: !one_forward,
            ..Recipe::default()
        }
    }
}

/// Prints the run's summary line and appends it to the JSON-lines file
/// when given.
pub fn emit(line: &serde_json::Value, json: Option<&Path>) -> std::io::Result<()> {
    println!("{line}");
    if let Some(j) = json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(j)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
