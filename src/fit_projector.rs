//! `tofy fit-projector`: a projector fitted in closed form, ridge regression
//! from the world vector to K target rows.
//!
//! The target of slot j for a pair is the mean input embedding of the j-th
//! K-th of the true reply's tokens (end-of-turn included), read from the
//! GGUF. Targets are centred on their corpus mean before the fit: raw means
//! of token rows share one large direction (norm 2.2 against 3.2 for a
//! token row, in SmolLM2), and a regression onto them would mostly learn
//! that constant. The projector then rescales each output row to the
//! token-embedding norm (`row_norm`), so the rows sit where token rows sit.
//! The regression loss says nothing about the decoder: K, the ridge weight
//! and the row norm are meant to be chosen by held-out NLL through
//! `tofy eval-conditioning`.

use nalgebra::{DMatrix, DVector};

use crate::projector::Projector;

/// Ridge regression with an unpenalised intercept: the `W` (`d x m`) and
/// `b` (`m`) minimising `||Y - X W - 1 b^T||^2 + lambda ||W||^2`, for `X`
/// `n x d` and `Y` `n x m`. `None` when the system is singular (lambda 0
/// and too few distinct rows).
pub fn ridge(
    x: &DMatrix<f64>,
    y: &DMatrix<f64>,
    lambda: f64,
) -> Option<(DMatrix<f64>, DVector<f64>)> {
    let x_mean = x.row_mean();
    let y_mean = y.row_mean();
    let xc = DMatrix::from_fn(x.nrows(), x.ncols(), |r, c| x[(r, c)] - x_mean[c]);
    let yc = DMatrix::from_fn(y.nrows(), y.ncols(), |r, c| y[(r, c)] - y_mean[c]);
    let mut gram = xc.transpose() * &xc;
    for i in 0..gram.nrows() {
        gram[(i, i)] += lambda;
    }
    let w = gram.cholesky()?.solve(&(xc.transpose() * &yc));
    let b = DVector::from_fn(y.ncols(), |c, _| {
        y_mean[c] - (0..x.ncols()).map(|r| x_mean[r] * w[(r, c)]).sum::<f64>()
    });
    Some((w, b))
}

/// The K slot targets of one reply (`k * width` values): the mean of each
/// of K contiguous chunks of its token rows (`rows`, `width` wide). A chunk
/// that gets no token (a reply shorter than K) takes the whole reply's mean.
pub fn slot_targets(rows: &[f32], width: usize, k: usize) -> Vec<f32> {
    let n = rows.len() / width;
    let mean_of = |from: usize, to: usize| -> Vec<f32> {
        let mut m = vec![0.0f32; width];
        for r in from..to {
            for (acc, v) in m.iter_mut().zip(&rows[r * width..(r + 1) * width]) {
                *acc += v / (to - from) as f32;
            }
        }
        m
    };
    let whole = mean_of(0, n);
    (0..k)
        .flat_map(|j| {
            let (from, to) = (j * n / k, (j + 1) * n / k);
            if to > from {
                mean_of(from, to)
            } else {
                whole.clone()
            }
        })
        .collect()
}

/// How well the fit explains the centred targets on the pairs it was fitted
/// on (1 - residual / total sum of squares): a sanity figure, not a
/// selection criterion.
#[derive(Debug, Clone, Copy)]
pub struct FitSummary {
    pub pairs: usize,
    pub r_squared: f64,
}

/// Fits a projector from world vectors (`vectors`, one per pair) to slot
/// targets (`targets`, `k * width` per pair), centred on their mean.
pub fn fit(
    vectors: &[Vec<f32>],
    targets: &[Vec<f32>],
    k: usize,
    width: usize,
    lambda: f64,
    row_norm: f32,
    gguf_name: &str,
) -> Option<(Projector, FitSummary)> {
    let n = vectors.len();
    let d = vectors.first()?.len();
    let m = k * width;
    let x = DMatrix::from_fn(n, d, |r, c| f64::from(vectors[r][c]));
    let y = DMatrix::from_fn(n, m, |r, c| f64::from(targets[r][c]));
    // Centring the targets only moves the intercept: the rows' common
    // direction goes, what differs between replies stays.
    let y_mean = y.row_mean();
    let yc = DMatrix::from_fn(n, m, |r, c| y[(r, c)] - y_mean[c]);
    let (w, b) = ridge(&x, &yc, lambda)?;
    let fitted = &x * &w;
    let (mut sse, mut sst) = (0.0, 0.0);
    for r in 0..n {
        for c in 0..m {
            sse += (yc[(r, c)] - fitted[(r, c)] - b[c]).powi(2);
            sst += yc[(r, c)].powi(2);
        }
    }
    // The projector's weight is [k * width, d]: the transpose of W.
    let weight: Vec<f32> = (0..m)
        .flat_map(|c| (0..d).map(move |r| (c, r)))
        .map(|(c, r)| w[(r, c)] as f32)
        .collect();
    let bias: Vec<f32> = b.iter().map(|&v| v as f32).collect();
    let projector = Projector::from_parts(
        weight,
        bias,
        k,
        width,
        d,
        Some(row_norm),
        gguf_name,
        format!("fitted projector (ridge {lambda}, K {k})"),
    );
    Some((
        projector,
        FitSummary {
            pairs: n,
            r_squared: 1.0 - sse / sst.max(f64::MIN_POSITIVE),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed form on the augmented design `[X 1]` with the penalty on
    /// W only: `(A^T A + diag(lambda.., 0))^-1 A^T Y`, by LU (another
    /// route than `ridge`'s centring and Cholesky).
    fn augmented(x: &DMatrix<f64>, y: &DMatrix<f64>, lambda: f64) -> DMatrix<f64> {
        let (n, d) = (x.nrows(), x.ncols());
        let a = DMatrix::from_fn(n, d + 1, |r, c| if c < d { x[(r, c)] } else { 1.0 });
        let mut lhs = a.transpose() * &a;
        for i in 0..d {
            lhs[(i, i)] += lambda;
        }
        lhs.lu().solve(&(a.transpose() * y)).unwrap()
    }

    #[test]
    fn ridge_recovers_a_known_map_and_matches_the_closed_form() {
        let (n, d, m) = (40, 3, 5);
        // Deterministic, well-spread inputs and a known map with intercept.
        let x = DMatrix::from_fn(n, d, |r, c| {
            ((r * 7 + c * 13) % 11) as f64 - 5.0 + c as f64 * 0.3
        });
        let w_true = DMatrix::from_fn(d, m, |r, c| (r as f64 + 1.0) * 0.5 - c as f64 * 0.25);
        let b_true = DVector::from_fn(m, |c, _| c as f64 - 2.0);
        let y = DMatrix::from_fn(n, m, |r, c| {
            (0..d).map(|k| x[(r, k)] * w_true[(k, c)]).sum::<f64>() + b_true[c]
        });
        let (w, b) = ridge(&x, &y, 0.0).unwrap();
        assert!((&w - &w_true).abs().max() < 1e-9, "W recovered");
        assert!((&b - &b_true).abs().max() < 1e-9, "b recovered");
        for lambda in [0.5, 10.0] {
            let (w, b) = ridge(&x, &y, lambda).unwrap();
            let closed = augmented(&x, &y, lambda);
            assert!(
                (w - closed.rows(0, d)).abs().max() < 1e-9,
                "lambda {lambda}"
            );
            assert!((b.transpose() - closed.row(d)).abs().max() < 1e-9);
        }
        // The projector carries the map: the row for x_0 is W^T x_0 + b.
        let vectors: Vec<Vec<f32>> = (0..n)
            .map(|r| (0..d).map(|c| x[(r, c)] as f32).collect())
            .collect();
        let targets: Vec<Vec<f32>> = (0..n)
            .map(|r| (0..m).map(|c| y[(r, c)] as f32).collect())
            .collect();
        let (p, summary) = fit(&vectors, &targets, 1, m, 0.0, 1.0, "t").unwrap();
        assert!(summary.r_squared > 0.999_999, "{summary:?}");
        let row = p.project(&vectors[0]).unwrap();
        let mean: Vec<f64> = (0..m).map(|c| y.column(c).mean()).collect();
        let want: Vec<f64> = (0..m).map(|c| y[(0, c)] - mean[c]).collect();
        let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (got, want) in row.row(0).iter().zip(&want) {
            assert!(
                (f64::from(*got) - want / norm).abs() < 1e-4,
                "{got} vs {}",
                want / norm
            );
        }
    }

    #[test]
    fn chunks_split_the_reply_and_short_replies_fall_back_to_the_whole_mean() {
        // Four rows of width 2: (0,0), (2,2), (4,4), (6,6).
        let rows = [0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0];
        assert_eq!(slot_targets(&rows, 2, 2), vec![1.0, 1.0, 5.0, 5.0]);
        // One row, K = 2: the first chunk is empty and takes the whole mean.
        assert_eq!(slot_targets(&[3.0, 1.0], 2, 2), vec![3.0, 1.0, 3.0, 1.0]);
    }
}
