//! Static groups on a layer taller than one row chunk of the solver: every
//! output row's grid must be the one fitted on its own original weights.
//! The solver walks rows in chunks of 256 and each chunk reads its slice
//! of the static grids at its row offset; a chunk reading another chunk's
//! rows fails here.

mod common;

use common::{inputs, weight, Rng};
use vlmq::hessian::HessianAccumulator;
use vlmq::{quantize_rtn, solve_layer, Bits, GptqConfig, GroupSize, Method, QuantScheme};

#[test]
fn static_grids_follow_their_rows_across_row_chunks() {
    let mut rng = Rng::new(41);
    // 600 rows: three chunks, the last one ragged.
    let (m, n) = (600, 32);
    let w = weight(&mut rng, m, n);
    // Rows of very different magnitude make every row's grid its own.
    let w = ndarray::Array2::from_shape_fn((m, n), |(r, c)| w[[r, c]] * (1.0 + r as f32));
    let x = inputs(&mut rng, 4 * n, n);
    let mut acc = HessianAccumulator::<f32>::new(n);
    acc.add(x.view(), None).unwrap();
    let stats = acc.finish().unwrap();
    let scheme =
        QuantScheme::new(Bits::new(3).unwrap()).with_group_size(GroupSize::new(8).unwrap());
    let cfg = GptqConfig::new(scheme).with_static_groups(true).unwrap();
    for method in [Method::Gptq, Method::Gptaq { strength: 0.25 }] {
        let stats = match method {
            Method::Gptq => stats.clone(),
            Method::Gptaq { .. } => {
                let mut acc = HessianAccumulator::<f32>::with_cross_term(n);
                acc.add_paired(x.view(), x.view(), None).unwrap();
                acc.finish().unwrap()
            }
        };
        let sol = solve_layer(w.view(), &stats, &cfg, method).unwrap();
        // Static grids are fitted on the original weight, as RTN fits them.
        let rtn = quantize_rtn(w.view(), &scheme).unwrap();
        assert_eq!(sol.weight.scales(), rtn.scales(), "{method:?}");
        assert_eq!(sol.weight.zeros(), rtn.zeros(), "{method:?}");
    }
}
