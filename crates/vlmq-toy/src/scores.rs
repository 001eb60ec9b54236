//! Held-out answer scores: the model's log-probabilities over the vocabulary at
//! the question mark, from which accuracy, the answer's negative log-likelihood
//! and the divergence from a reference model (full precision) follow.
//!
//! Accuracy moves in steps of one example and ties often at low bit widths;
//! the log-likelihood and the KL divergence from the full-precision model are
//! continuous, so they separate methods whose accuracies tie.

use ndarray::{Array2, Axis};
use rayon::prelude::*;

use super::model::to_sample;
use super::task::VqaExample;
use vlmq::error::{Error, Result};
use vlmq_nn::SequenceModel;

/// Log-probabilities of every vocabulary token at the question mark of each
/// example, with the correct answers.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerScores {
    /// `examples x vocabulary` natural-log probabilities.
    log_probs: Array2<f64>,
    /// The correct answer token of each example.
    answers: Vec<usize>,
}

impl AnswerScores {
    /// Runs `model` on every example (in parallel; the result does not depend
    /// on the thread count) and keeps the log-softmax of the logits at the
    /// question mark, computed in `f64`.
    pub fn compute(model: &SequenceModel, examples: &[VqaExample]) -> Result<Self> {
        let rows: Vec<Vec<f64>> = examples
            .par_iter()
            .map(|ex| {
                let logits = model.logits(&to_sample(ex))?;
                let last = logits.index_axis(Axis(0), logits.nrows() - 1);
                Ok(log_softmax(last.iter().map(|&v| f64::from(v))))
            })
            .collect::<Result<_>>()?;
        let vocab = rows.first().map_or(0, Vec::len);
        if let Some(row) = rows.iter().find(|r| r.len() != vocab) {
            return Err(Error::shape("answer logits", &[vocab], &[row.len()]));
        }
        let flat: Vec<f64> = rows.into_iter().flatten().collect();
        let log_probs = Array2::from_shape_vec((examples.len(), vocab), flat)
            .map_err(|_| Error::shape("answer scores", &[examples.len(), vocab], &[]))?;
        Ok(AnswerScores {
            log_probs,
            answers: examples.iter().map(|ex| ex.answer).collect(),
        })
    }

    /// Number of scored examples.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether no example was scored.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Fraction of examples whose most likely token is the answer (ties go to
    /// the lowest token id); 0 for no examples.
    pub fn accuracy(&self) -> f64 {
        let correct = self
            .log_probs
            .outer_iter()
            .zip(&self.answers)
            .filter(|(row, &answer)| argmax(row.iter().copied()) == answer)
            .count();
        correct as f64 / self.len().max(1) as f64
    }

    /// Mean negative log-likelihood of the correct answer, in nats; 0 for no
    /// examples.
    pub fn mean_nll(&self) -> f64 {
        let total: f64 = self
            .log_probs
            .outer_iter()
            .zip(&self.answers)
            .map(|(row, &answer)| -row[answer])
            .sum();
        total / self.len().max(1) as f64
    }

    /// Mean KL divergence `KL(reference || self)` of the answer distributions,
    /// in nats: how far these predictions moved from the reference's. An error
    /// when the two were scored on different example counts or vocabularies.
    pub fn mean_kl_from(&self, reference: &AnswerScores) -> Result<f64> {
        if reference.log_probs.dim() != self.log_probs.dim() {
            let (rn, rv) = reference.log_probs.dim();
            let (n, v) = self.log_probs.dim();
            return Err(Error::shape("answer scores", &[rn, rv], &[n, v]));
        }
        let total: f64 = reference
            .log_probs
            .outer_iter()
            .zip(self.log_probs.outer_iter())
            .map(|(p, q)| {
                p.iter()
                    .zip(q.iter())
                    .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                    .sum::<f64>()
            })
            .sum();
        Ok(total / self.len().max(1) as f64)
    }
}

/// Numerically stable log-softmax.
fn log_softmax(logits: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let max = logits.clone().fold(f64::NEG_INFINITY, f64::max);
    let log_sum = logits.clone().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    logits.map(|v| v - log_sum).collect()
}

/// Index of the largest value, the first on ties; 0 for an empty input.
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    values
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::array;

    fn scores(logits: Array2<f64>, answers: Vec<usize>) -> AnswerScores {
        let rows: Vec<f64> = logits
            .outer_iter()
            .flat_map(|r| log_softmax(r.iter().copied()))
            .collect();
        AnswerScores {
            log_probs: Array2::from_shape_vec(logits.dim(), rows).unwrap(),
            answers,
        }
    }

    #[test]
    fn log_softmax_normalizes_and_survives_large_logits() {
        let lp = log_softmax([1000.0, 1000.0, 1000.0 - 2f64.ln()].into_iter());
        let total: f64 = lp.iter().map(|v| v.exp()).sum();
        assert_abs_diff_eq!(total, 1.0, epsilon = 1e-12);
        // Two equal logits and one with half their probability: 0.4, 0.4, 0.2.
        assert_abs_diff_eq!(lp[0], 0.4f64.ln(), epsilon = 1e-12);
        assert_abs_diff_eq!(lp[2], 0.2f64.ln(), epsilon = 1e-12);
    }

    #[test]
    fn accuracy_and_nll_by_hand() {
        // Example 0 predicts token 1 (correct), example 1 predicts token 0 (wrong).
        let s = scores(array![[0.0, 2.0], [1.0, 0.0]], vec![1, 1]);
        assert_abs_diff_eq!(s.accuracy(), 0.5);
        let nll0 = (1.0 + (-2.0f64).exp()).ln();
        let nll1 = 1.0 + (1.0 + (-1.0f64).exp()).ln();
        assert_abs_diff_eq!(s.mean_nll(), (nll0 + nll1) / 2.0, epsilon = 1e-12);
    }

    #[test]
    fn kl_is_zero_for_itself_and_matches_the_closed_form() {
        let p = scores(array![[0.0, 0.0]], vec![0]);
        let q = scores(array![[0.0, 3f64.ln()]], vec![0]);
        assert_abs_diff_eq!(p.mean_kl_from(&p).unwrap(), 0.0);
        // KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3).
        let expected = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert_abs_diff_eq!(q.mean_kl_from(&p).unwrap(), expected, epsilon = 1e-12);
        assert!(p.mean_kl_from(&q).unwrap() > 0.0);
    }

    #[test]
    fn kl_rejects_different_shapes() {
        let p = scores(array![[0.0, 0.0]], vec![0]);
        let q = scores(array![[0.0, 0.0], [1.0, 0.0]], vec![0, 0]);
        assert!(matches!(
            q.mean_kl_from(&p),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn empty_scores_are_zero_not_nan() {
        let s = scores(Array2::zeros((0, 3)), vec![]);
        assert!(s.is_empty());
        assert_eq!(s.accuracy(), 0.0);
        assert_eq!(s.mean_nll(), 0.0);
    }
}
