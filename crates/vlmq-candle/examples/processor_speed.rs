//! Times an image processor on image files: the decoded image through
//! resize, tiling or patching and normalization to the model's pixel
//! values (decoding is not timed), as `scripts/processor_speed.py` compares
//! with transformers' PIL-backend processors.
//!
//! ```text
//! processor_speed qwen2_vl|smolvlm MODEL_DIR REPEATS IMAGE...
//! ```
//!
//! `MODEL_DIR` holds the processor's `processor_config.json` (or
//! `preprocessor_config.json`). Prints one line per image: the path, the
//! median time in milliseconds over `REPEATS` runs, and the number of pixel
//! values made.

use std::path::Path;
use std::time::Instant;

use vlmq::{Error, Result};
use vlmq_candle::process::image_input::load_image;
use vlmq_candle::process::qwen2_vl_image::{process_image, Qwen2VlImageConfig};
use vlmq_candle::process::smolvlm_image::SmolVlmImageProcessor;

/// One processor, run on a decoded image, giving its pixel-value count.
type Run = Box<dyn Fn(&image::RgbImage) -> Result<usize>>;

fn processor(family: &str, dir: &Path) -> Result<Run> {
    match family {
        "qwen2_vl" => {
            let cfg = Qwen2VlImageConfig::from_dir(dir)?;
            Ok(Box::new(move |img| Ok(process_image(img, &cfg)?.0.len())))
        }
        "smolvlm" => {
            let p = SmolVlmImageProcessor::from_model_dir(dir)?;
            Ok(Box::new(move |img| {
                let f = p.frames(img)?;
                Ok(f.frames.iter().map(|fr| p.normalize(fr).len()).sum())
            }))
        }
        other => Err(Error::Unsupported {
            what: format!("processor family {other:?}"),
            remedy: "name qwen2_vl or smolvlm".into(),
        }),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [family, dir, repeats, images @ ..] = args.as_slice() else {
        eprintln!("usage: processor_speed qwen2_vl|smolvlm MODEL_DIR REPEATS IMAGE...");
        std::process::exit(2);
    };
    let repeats: usize = repeats
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::field("command line", "REPEATS", "not a positive integer"))?;
    let run = processor(family, Path::new(dir))?;
    for path in images {
        let img = load_image(path)?;
        let values = run(&img)?;
        let mut ms: Vec<f64> = (0..repeats)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(run(&img)).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        println!("{path}\t{:.3}\t{values}", ms[ms.len() / 2]);
    }
    Ok(())
}
