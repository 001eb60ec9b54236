//! Writes a random-weight Llama checkpoint in bf16, one safetensors shard
//! per decoder layer plus one for the embedding, final norm and head, with
//! `model.safetensors.index.json` and `config.json` (for memory
//! measurements on a model's real shapes without downloading it).
//!
//! ```text
//! cargo run --release -p vlmq-candle --example random_checkpoint -- OUT_DIR \
//!     [layers 32] [hidden 4096] [mlp 11008] [vocab 32000] [heads 32]
//! ```
//!
//! Weights are uniform with the variance of `N(0, 1/fan_in)` (norm gains
//! 1, embedding variance 1), generated and written a tensor at a time, so
//! the writer's memory stays small whatever the model size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use vlmq::__private::SplitMix64;
use vlmq::half::bf16;

/// One tensor of a shard: name, shape and the standard deviation of its values
/// (`None`: every value is 1).
type Spec = (String, Vec<usize>, Option<f32>);

/// Writes one shard, generating each tensor's values as it goes.
fn write_shard(path: &Path, tensors: &[Spec], rng: &mut SplitMix64) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut w = BufWriter::with_capacity(1 << 22, File::create(path)?);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(&text)?;
    let mut buf = Vec::with_capacity(1 << 20);
    for (_, shape, std) in tensors {
        let n: usize = shape.iter().product();
        // Uniform on [-a, a] has variance a^2 / 3.
        let a = std.map(|s| s * 3f32.sqrt());
        for _ in 0..n {
            let v = match a {
                Some(a) => ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a,
                None => 1.0,
            };
            buf.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            if buf.len() >= 1 << 20 {
                w.write_all(&buf)?;
                buf.clear();
            }
        }
    }
    w.write_all(&buf)?;
    w.flush()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = Path::new(
        args.first()
            .ok_or("usage: random_checkpoint OUT_DIR [layers hidden mlp vocab heads]")?,
    );
    let num = |i: usize, d: usize| -> Result<usize, String> {
        args.get(i)
            .map_or(Ok(d), |s| s.parse().map_err(|e| format!("{s}: {e}")))
    };
    let (layers, d, f, vocab, heads) = (
        num(1, 32)?,
        num(2, 4096)?,
        num(3, 11008)?,
        num(4, 32000)?,
        num(5, 32)?,
    );
    std::fs::create_dir_all(out)?;
    let shards = layers + 1;
    let shard = |k: usize| format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
    let mut map = BTreeMap::new();
    let mut rng = SplitMix64::from_state(0x7b_5eed);
    let inv = |fan_in: usize| Some(1.0 / (fan_in as f32).sqrt());
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        let specs: Vec<Spec> = vec![
            (format!("{p}input_layernorm.weight"), vec![d], None),
            (format!("{p}post_attention_layernorm.weight"), vec![d], None),
            (format!("{p}self_attn.q_proj.weight"), vec![d, d], inv(d)),
            (format!("{p}self_attn.k_proj.weight"), vec![d, d], inv(d)),
            (format!("{p}self_attn.v_proj.weight"), vec![d, d], inv(d)),
            (format!("{p}self_attn.o_proj.weight"), vec![d, d], inv(d)),
            (format!("{p}mlp.gate_proj.weight"), vec![f, d], inv(d)),
            (format!("{p}mlp.up_proj.weight"), vec![f, d], inv(d)),
            (format!("{p}mlp.down_proj.weight"), vec![d, f], inv(f)),
        ];
        write_shard(&out.join(shard(l)), &specs, &mut rng)?;
        for (name, _, _) in specs {
            map.insert(name, shard(l));
        }
        eprint!("\rlayer {}/{layers}", l + 1);
    }
    let outer: Vec<Spec> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![vocab, d],
            Some(1.0),
        ),
        ("model.norm.weight".into(), vec![d], None),
        ("lm_head.weight".into(), vec![vocab, d], inv(d)),
    ];
    write_shard(&out.join(shard(layers)), &outer, &mut rng)?;
    for (name, _, _) in outer {
        map.insert(name, shard(layers));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string())?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    });
    std::fs::write(out.join("config.json"), config.to_string())?;
    eprintln!("\nwrote {}", out.display());
    Ok(())
}
