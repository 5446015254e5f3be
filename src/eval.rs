//! `tofy eval-world`: does a world model predict the next turn better than
//! trivial baselines, and are its latents spread out rather than collapsed?
//!
//! On held-out `context<TAB>next` pairs it compares the transition's
//! prediction with the encoding of the real next turn — by the EMA teacher
//! the model was trained against when it is given, else by the model's own
//! encoder — against two baselines:
//! "copy" (predict the context's own latent) and "mean" (predict the mean of
//! all held-out next-turn latents, an oracle constant). Retrieval ranks the
//! true next turn among `RETRIEVAL_CANDIDATES` held-out next turns.

use ndarray::{Array1, Array2, ArrayView1, Axis};
use serde::Serialize;

use crate::data::pairs::Pair;
use crate::world::{Encoded, Result, WorldModel, encode};

/// Candidates per retrieval query, the true one included.
pub const RETRIEVAL_CANDIDATES: usize = 100;

/// Mean cosine similarity and mean L2 distance of predictions to targets,
/// and the share of the targets' variance the predictions explain.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scores {
    pub cosine: f64,
    pub l2: f64,
    /// 1 − Σ‖target − prediction‖² / Σ‖target − mean target‖²: 1 for a
    /// perfect prediction, 0 for the mean baseline, below 0 for a
    /// prediction worse than the mean. Uncalibrated: a prediction of the
    /// right direction at the wrong scale scores low.
    pub r2: f64,
}

/// Share of queries whose true next turn ranks first / in the first five.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Retrieval {
    pub top1: f64,
    pub top5: f64,
}

/// Everything `eval-world` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Pairs evaluated (both sides have tokens).
    pub pairs: usize,
    pub transition: Scores,
    pub copy_baseline: Scores,
    pub mean_baseline: Scores,
    /// Mean and smallest per-dimension std of the held-out context latents.
    pub latent_std_mean: f64,
    pub latent_std_min: f64,
    /// exp(entropy) of the latent covariance spectrum, between 1 (collapsed
    /// to a line) and dim (isotropic).
    pub effective_rank: f64,
    pub dim: usize,
    pub candidates: usize,
    pub retrieval_model: Retrieval,
    pub retrieval_copy: Retrieval,
    pub retrieval_chance: Retrieval,
    /// Held-out R² of the best linear map from the prediction to the next
    /// turn's latent: what a linear reader (the projector is one) can get
    /// out of the prediction, whatever its scale and rotation. Two-fold: a
    /// ridge fitted on each half of the pairs (file order, so the halves
    /// share at most one conversation) scores the other half, against that
    /// half's variance about the fitting half's mean.
    /// `None` (JSON null) where it is undefined: fewer than 4 pairs, or
    /// inputs or targets without spread.
    pub ridge_r2_transition: Option<f64>,
    /// The same for the context's own latent (what the encoder alone knows
    /// about the reply).
    pub ridge_r2_copy: Option<f64>,
}

/// Held-out ridge R² against a reply latent that is not the model's own:
/// another world model's encoding of the next turn (with its own vocab and
/// max_seq). Scored against one fixed encoder, two models' predictions can
/// be compared; against each one's own, a model whose latents are less
/// spread has the easier target.
#[derive(Debug, Clone, Serialize)]
pub struct AgainstEncoder {
    /// The checkpoint whose encoder made the targets.
    pub encoder: String,
    /// Pairs scored (both sides have tokens for their reader).
    pub pairs: usize,
    /// From the model's prediction.
    pub prediction: Option<f64>,
    /// From the model's context latent.
    pub context: Option<f64>,
}

/// [`AgainstEncoder`] on up to `max_pairs` of `pairs` (file order).
pub fn ridge_r2_against(
    model: &WorldModel,
    encoder: &WorldModel,
    name: String,
    pairs: &[Pair],
    max_pairs: usize,
) -> Result<AgainstEncoder> {
    let (contexts, nexts): (Vec<Encoded>, Vec<Encoded>) = pairs
        .iter()
        .filter_map(|p| {
            Some((
                encode(model.vocab(), &p.context, model.config().max_seq)?,
                encode(encoder.vocab(), &p.next, encoder.config().max_seq)?,
            ))
        })
        .take(max_pairs)
        .unzip();
    let from_context = model.forward(&contexts)?;
    let target = encoder.forward(&nexts)?.state;
    Ok(AgainstEncoder {
        encoder: name,
        pairs: target.nrows(),
        prediction: ridge_r2(&from_context.next, &target),
        context: ridge_r2(&from_context.state, &target),
    })
}

/// The ridge weight of [`ridge_r2`], as a fraction of the inputs' mean
/// variance per dimension times the pairs: fixed before any model was
/// scored with it.
pub const RIDGE_LAMBDA_FRACTION: f64 = 0.01;

/// Evaluates `model` on up to `max_pairs` of `pairs` (in file order);
/// next turns are encoded by `targets` (the teacher, or `model` itself).
pub fn evaluate(
    model: &WorldModel,
    targets: &WorldModel,
    pairs: &[Pair],
    max_pairs: usize,
) -> Result<EvalReport> {
    let max_seq = model.config().max_seq;
    let (contexts, nexts): (Vec<Encoded>, Vec<Encoded>) = pairs
        .iter()
        .filter_map(|p| {
            Some((
                encode(model.vocab(), &p.context, max_seq)?,
                encode(model.vocab(), &p.next, max_seq)?,
            ))
        })
        .take(max_pairs)
        .unzip();
    let from_context = model.forward(&contexts)?;
    let target = targets.forward(&nexts)?.state;
    let (state, predicted) = (from_context.state, from_context.next);
    let n = target.nrows();

    let mean_target = target
        .mean_axis(Axis(0))
        .unwrap_or_else(|| Array1::zeros(target.ncols()));
    let mean_rows = mean_target
        .broadcast(target.raw_dim())
        .expect("row broadcast")
        .to_owned();
    let std = state.std_axis(Axis(0), 0.0);
    let candidates = RETRIEVAL_CANDIDATES.min(n);
    Ok(EvalReport {
        pairs: n,
        transition: scores(&predicted, &target),
        copy_baseline: scores(&state, &target),
        mean_baseline: scores(&mean_rows, &target),
        latent_std_mean: std.mean().map_or(0.0, f64::from),
        latent_std_min: std.iter().copied().fold(f32::INFINITY, f32::min).into(),
        effective_rank: effective_rank(&state),
        dim: state.ncols(),
        candidates,
        retrieval_model: retrieval(&predicted, &target, candidates),
        retrieval_copy: retrieval(&state, &target, candidates),
        retrieval_chance: Retrieval {
            top1: 1.0 / candidates.max(1) as f64,
            top5: 5.0_f64.min(candidates as f64) / candidates.max(1) as f64,
        },
        ridge_r2_transition: ridge_r2(&predicted, &target),
        ridge_r2_copy: ridge_r2(&state, &target),
    })
}

/// Two-fold held-out R² of a ridge map from `inputs` to `targets` (rows
/// are pairs); `None` with fewer than 4 pairs, or inputs or targets
/// without spread.
pub fn ridge_r2(inputs: &Array2<f32>, targets: &Array2<f32>) -> Option<f64> {
    use nalgebra::DMatrix;

    let n = inputs.nrows();
    if n < 4 {
        return None;
    }
    let matrix = |a: &Array2<f32>, rows: std::ops::Range<usize>| {
        DMatrix::from_fn(rows.len(), a.ncols(), |r, c| {
            f64::from(a[(rows.start + r, c)])
        })
    };
    let half = n / 2;
    let (mut residual, mut total) = (0.0, 0.0);
    for (fit, score) in [(0..half, half..n), (half..n, 0..half)] {
        let (x, y) = (matrix(inputs, fit.clone()), matrix(targets, fit));
        let x_mean = x.row_mean();
        let variance: f64 = (0..x.ncols())
            .map(|c| {
                x.column(c)
                    .iter()
                    .map(|v| (v - x_mean[c]).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / x.ncols() as f64;
        // Singular only for inputs without spread (the weight is then 0).
        let (w, b) = crate::fit_projector::ridge(&x, &y, RIDGE_LAMBDA_FRACTION * variance)?;
        let y_mean = y.row_mean();
        let (xs, ys) = (matrix(inputs, score.clone()), matrix(targets, score));
        let predicted = &xs * &w;
        for r in 0..ys.nrows() {
            for c in 0..ys.ncols() {
                residual += (ys[(r, c)] - predicted[(r, c)] - b[c]).powi(2);
                total += (ys[(r, c)] - y_mean[c]).powi(2);
            }
        }
    }
    (total > 0.0).then(|| 1.0 - residual / total)
}

fn cosine(a: ArrayView1<f32>, b: ArrayView1<f32>) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let na: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-12)
}

fn scores(predicted: &Array2<f32>, target: &Array2<f32>) -> Scores {
    let n = target.nrows().max(1) as f64;
    let mean = target.mapv(f64::from).mean_axis(Axis(0));
    let (mut cos, mut l2, mut residual, mut total) = (0.0, 0.0, 0.0, 0.0);
    for (p, t) in predicted.outer_iter().zip(target.outer_iter()) {
        cos += cosine(p, t);
        let squared: f64 = p
            .iter()
            .zip(t)
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        l2 += squared.sqrt();
        residual += squared;
        if let Some(mean) = &mean {
            total += t
                .iter()
                .zip(mean)
                .map(|(&v, &m)| (f64::from(v) - m).powi(2))
                .sum::<f64>();
        }
    }
    Scores {
        cosine: cos / n,
        l2: l2 / n,
        r2: if total > 0.0 {
            1.0 - residual / total
        } else {
            0.0
        },
    }
}

/// For each query i, ranks target i among `k` targets by cosine: itself and
/// the k−1 at offsets j·stride (mod n), a fixed pseudo-random spread that
/// avoids the neighbouring pairs of the same conversation.
fn retrieval(queries: &Array2<f32>, targets: &Array2<f32>, k: usize) -> Retrieval {
    let n = targets.nrows();
    if n == 0 {
        return Retrieval {
            top1: 0.0,
            top5: 0.0,
        };
    }
    let stride = [7919usize, 7907, 7901]
        .into_iter()
        .find(|s| gcd(*s, n) == 1)
        .unwrap_or(1);
    let (mut top1, mut top5) = (0usize, 0usize);
    for i in 0..n {
        let truth = cosine(queries.row(i), targets.row(i));
        let better = (1..k)
            .map(|j| (i + j * stride) % n)
            .filter(|&c| cosine(queries.row(i), targets.row(c)) > truth)
            .count();
        top1 += usize::from(better == 0);
        top5 += usize::from(better < 5);
    }
    Retrieval {
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// exp(entropy) of the normalised eigenvalues of the latents' covariance.
fn effective_rank(latents: &Array2<f32>) -> f64 {
    let n = latents.nrows();
    if n < 2 {
        return 0.0;
    }
    let x = latents.mapv(f64::from);
    let centered = &x - &x.mean_axis(Axis(0)).expect("n ≥ 2");
    let cov = centered.t().dot(&centered) / (n - 1) as f64;
    let d = cov.ncols();
    let matrix = nalgebra::DMatrix::from_fn(d, d, |r, c| cov[[r, c]]);
    let eigen = nalgebra::SymmetricEigen::new(matrix).eigenvalues;
    let positive: Vec<f64> = eigen.iter().copied().filter(|&v| v > 0.0).collect();
    let total: f64 = positive.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let entropy: f64 = positive
        .iter()
        .map(|&v| v / total)
        .map(|p| -p * p.ln())
        .sum();
    entropy.exp()
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(rng: &mut StdRng, rows: usize, cols: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| rng.random_range(-1.0f32..1.0))
    }

    /// A target that is a linear map of the input plus 10% noise (in
    /// standard deviation, so ~1% of the variance) scores near 1; a target
    /// the input knows nothing about scores near 0, and not above it.
    #[test]
    fn ridge_r2_reads_what_a_linear_map_of_the_input_knows() {
        let mut rng = StdRng::seed_from_u64(7);
        let x = random(&mut rng, 400, 8);
        let map = random(&mut rng, 8, 5);
        let noise = random(&mut rng, 400, 5) * 0.1;
        let y = x.dot(&map) + &noise + 3.0;
        let known = ridge_r2(&x, &y).unwrap();
        assert!(known > 0.95 && known < 1.0, "{known}");

        let unrelated = random(&mut rng, 400, 5);
        let none = ridge_r2(&x, &unrelated).unwrap();
        assert!(none < 0.0 && none > -0.1, "{none}");
        assert_eq!(
            ridge_r2(&x.slice(ndarray::s![..3, ..]).to_owned(), &y),
            None
        );
    }
}
