//! The candle backends' staged block forward: true-sequential GPTQ and
//! GPTAQ give the same codes and the same quantized model as the trait's
//! default (one whole `block_forward` per group plus one for the output).

use std::path::PathBuf;

use ndarray::{Array2, ArrayView2};
use vlmq::{
    Bits, GptqConfig, GroupSize, LinearInfo, PipelineConfig, QuantMethod, QuantScheme,
    QuantizableModel, RowSink, TokenInfo,
};
use vlmq_candle::candle_core::{DType, Device, Tensor};
use vlmq_candle::{
    load_llava_dir, load_qwen2_vl_dir, random_model, Architecture, ImageGrid, LlamaConfig,
    QwenVlSample, TextSample, VlmHidden, VlmSample,
};

/// A backend with its staged forward hidden: the trait's default runs.
struct Unstaged<M>(M);

impl<M: QuantizableModel> QuantizableModel for Unstaged<M> {
    type Sample = M::Sample;
    type Hidden = M::Hidden;
    fn num_blocks(&self) -> usize {
        self.0.num_blocks()
    }
    fn block_name(&self, b: usize) -> String {
        self.0.block_name(b)
    }
    fn linear_groups(&self, b: usize) -> Vec<Vec<LinearInfo>> {
        self.0.linear_groups(b)
    }
    fn token_info(&self, b: usize, s: &M::Sample) -> TokenInfo {
        self.0.token_info(b, s)
    }
    fn embed(&self, s: &M::Sample) -> vlmq::Result<M::Hidden> {
        self.0.embed(s)
    }
    fn block_forward(
        &self,
        b: usize,
        x: &M::Hidden,
        s: &M::Sample,
        sink: Option<&mut dyn RowSink>,
    ) -> vlmq::Result<M::Hidden> {
        self.0.block_forward(b, x, s, sink)
    }
    fn linear_weight(&self, b: usize, layer: &str) -> vlmq::Result<Array2<f32>> {
        self.0.linear_weight(b, layer)
    }
    fn set_linear_weight(
        &mut self,
        b: usize,
        layer: &str,
        w: ArrayView2<'_, f32>,
    ) -> vlmq::Result<()> {
        self.0.set_linear_weight(b, layer, w)
    }
}

fn configs() -> Vec<PipelineConfig> {
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(16).unwrap());
    [QuantMethod::Gptq, QuantMethod::Gptaq]
        .into_iter()
        .map(|m| PipelineConfig::new(m, GptqConfig::new(scheme)).with_capture_tokens(24))
        .collect()
}

/// Quantizes `staged` and `plain` (the same model) with every configuration
/// and checks codes, grids and every final weight for equality.
fn same_results<M: QuantizableModel>(
    make: impl Fn() -> M,
    samples: &[M::Sample],
    final_out: impl Fn(&M, &M::Sample) -> Tensor,
) {
    for cfg in configs() {
        let mut staged = make();
        let mut plain = Unstaged(make());
        let a = vlmq::quantize_model(&mut staged, samples, &cfg, |_| {}).unwrap();
        let b = vlmq::quantize_model(&mut plain, samples, &cfg, |_| {}).unwrap();
        assert_eq!(a.weights, b.weights, "{}: codes and grids", cfg.method());
        for s in samples {
            let (x, y) = (final_out(&staged, s), final_out(&plain.0, s));
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{}", cfg.method());
        }
    }
}

/// The last block's output of a sample, through every block.
fn through<M: QuantizableModel>(m: &M, s: &M::Sample) -> M::Hidden {
    let mut h = m.embed(s).unwrap();
    for b in 0..m.num_blocks() {
        h = m.block_forward(b, &h, s, None).unwrap();
    }
    h
}

#[test]
fn llama_staged_true_sequential_matches_the_default() {
    let cfg = LlamaConfig {
        arch: Architecture::Llama,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 1e4,
        rms_eps: 1e-5,
        tie_embeddings: true,
        qkv_bias: false,
    };
    let samples: Vec<TextSample> = [9usize, 14, 11, 6]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            TextSample::causal((0..n).map(|t| ((t * 37 + i * 11) % 300) as u32).collect())
        })
        .collect();
    same_results(
        || random_model(&cfg, 5, DType::F32).unwrap(),
        &samples,
        through,
    );
}

#[test]
fn llava_staged_true_sequential_matches_the_default() {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf-tiny/llava"
    ));
    let exp =
        vlmq_candle::candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let rows = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let px = exp["pixel_values"].to_dtype(DType::F32).unwrap();
    let make = || load_llava_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let id = make().config().image_token_id;
    let samples = vec![
        VlmSample::causal(rows[0].clone(), Some(px.narrow(0, 0, 1).unwrap()))
            .without_image_targets(id),
        VlmSample::causal(rows[1].clone(), Some(px.narrow(0, 1, 1).unwrap()))
            .without_image_targets(id),
        VlmSample::causal(rows[0][..6].to_vec(), None),
    ];
    same_results(make, &samples, |m, s| match through(m, s) {
        VlmHidden::Text(t) => t,
        VlmHidden::Vision(_) => panic!("the last block gives text"),
    });
}

/// Qwen2-VL and Qwen2.5-VL (M-RoPE decoder stages, windowed tower) on the
/// hf-tiny-vlm samples: every block quantized, staged or not, gives the
/// same codes and the same final hidden state.
#[test]
fn qwen2_vl_staged_true_sequential_matches_the_default() {
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf-tiny-vlm")
            .join(name);
        let exp = vlmq_candle::candle_core::safetensors::load(
            dir.join("expected.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let ids = exp["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        let g: Vec<i64> = exp["image_grid_thw"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let g: Vec<ImageGrid> = g
            .chunks(3)
            .map(|c| ImageGrid {
                t: c[0] as usize,
                h: c[1] as usize,
                w: c[2] as usize,
            })
            .collect();
        let px = &exp["pixel_values"];
        let (p0, p1) = (g[0].patches(), g[1].patches() + g[2].patches());
        let samples = vec![
            QwenVlSample::causal(
                ids[0].clone(),
                Some(px.narrow(0, 0, p0).unwrap()),
                vec![g[0]],
            ),
            QwenVlSample::causal(
                ids[1].clone(),
                Some(px.narrow(0, p0, p1).unwrap()),
                vec![g[1], g[2]],
            ),
        ];
        same_results(
            || load_qwen2_vl_dir(&dir, DType::F32, &Device::Cpu).unwrap().0,
            &samples,
            |m, s| match through(m, s) {
                VlmHidden::Text(t) => t,
                VlmHidden::Vision(_) => panic!("the last block gives text"),
            },
        );
    }
}
