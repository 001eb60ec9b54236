//! `vlmq`: quantize a model, evaluate it, inspect a checkpoint.
//!
//! Errors print as one sentence per cause (`error: ...`, then `caused by:
//! ...`) and exit with code 1; a run cancelled with Ctrl-C exits with 130.

mod args;
mod eval;
mod inspect;
mod progress;
mod quantize;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    vlmq_candle::prefer_sample_parallelism();
    let cli = args::Cli::parse();
    let result = match cli.command {
        args::Command::Quantize(a) => quantize::run(a),
        args::Command::Eval(a) => eval::run(a),
        args::Command::Inspect(a) => inspect::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.root(), vlmq::Error::Cancelled) => {
            eprintln!("cancelled; rerun with the same --state-dir to resume");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                eprintln!("caused by: {c}");
                cause = c.source();
            }
            ExitCode::from(1)
        }
    }
}
