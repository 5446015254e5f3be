//! `tofy eval-conditioning`: does the world model's conditioning make the
//! decoder expect the true reply?
//!
//! For each `context<TAB>reply` pair, the decoder scores the true reply
//! (teacher-forced, the end-of-turn token included) after the same chat
//! prompt, `[conditioning message] user: context`, under each [`EvalMode`].
//! The mismatched modes use the vector of another pair (a derangement:
//! never the pair's own), the mean mode the mean vector of the pairs
//! evaluated, so that a gain can be told apart from what any conditioning
//! message or any steer does. Differences between modes are paired (same
//! pairs, same reply tokens) with a percentile bootstrap over pairs.
//!
//! Per mode, the NLL is the token-weighted mean over the pairs (total NLL /
//! total reply tokens); a paired difference is the same statistic for the
//! difference, which is what the bootstrap resamples.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::conditioning::{CondFormat, CondMode, Conditioning};
use crate::data::pairs::Pair;
use crate::decoder::ControlVector;
use crate::decoder::{ChatMessage, DecoderError, Role, ScoreRequest};
use crate::engine::{Engine, EngineError, Steer};
use crate::projector::{Projector, ProjectorError};
use crate::world::{WorldError, WorldModel};

/// What the decoder sees before the user turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum EvalMode {
    /// No conditioning message.
    None,
    /// The seed's digits of the pair's own vector.
    Text,
    /// The same message with another pair's vector.
    MismatchedText,
    /// The projector's rows of the pair's own vector.
    Prefix,
    /// The projector's rows of another pair's vector.
    MismatchedPrefix,
    /// The projector's rows of the mean vector: a steer with nothing
    /// specific to the pair.
    MeanPrefix,
    /// The projector's rows of `bridge(encoder(true reply))`: what a
    /// perfect transition would predict, an upper bound on what the channel
    /// carries (it reads the answer, so it is never a mode to serve).
    OraclePrefix,
    /// No message; the control map's vector of the pair's own world vector
    /// added to the residual stream (`--control`).
    Cvec,
    /// The same with another pair's vector.
    MismatchedCvec,
}

impl EvalMode {
    pub const ALL: [Self; 9] = [
        Self::None,
        Self::Text,
        Self::MismatchedText,
        Self::Prefix,
        Self::MismatchedPrefix,
        Self::MeanPrefix,
        Self::OraclePrefix,
        Self::Cvec,
        Self::MismatchedCvec,
    ];

    /// Whether the mode needs a control map.
    pub fn needs_control(self) -> bool {
        matches!(self, Self::Cvec | Self::MismatchedCvec)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Text => "text",
            Self::MismatchedText => "mismatched_text",
            Self::Prefix => "prefix",
            Self::MismatchedPrefix => "mismatched_prefix",
            Self::MeanPrefix => "mean_prefix",
            Self::OraclePrefix => "oracle_prefix",
            Self::Cvec => "cvec",
            Self::MismatchedCvec => "mismatched_cvec",
        }
    }
}

/// The differences reported, `a - b`: negative means `a` expects the true
/// reply more. Only those whose two modes were both scored are reported.
pub const PAIRED: [(EvalMode, EvalMode); 9] = [
    (EvalMode::Prefix, EvalMode::None),
    (EvalMode::Prefix, EvalMode::MismatchedPrefix),
    (EvalMode::Prefix, EvalMode::MeanPrefix),
    (EvalMode::Text, EvalMode::None),
    (EvalMode::Text, EvalMode::MismatchedText),
    (EvalMode::OraclePrefix, EvalMode::None),
    (EvalMode::OraclePrefix, EvalMode::MismatchedPrefix),
    (EvalMode::Cvec, EvalMode::None),
    (EvalMode::Cvec, EvalMode::MismatchedCvec),
];

/// How an evaluation runs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The modes scored, in [`EvalMode::ALL`]'s order (a validation search
    /// scores only the prefix modes, to save time).
    pub modes: Vec<EvalMode>,
    /// Seed of the pair sample, the derangement and the bootstrap.
    pub seed: u64,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Scorings in flight at once (the decoder's parallel sequences).
    pub parallel: usize,
    /// The text format of the text modes.
    pub format: CondFormat,
    /// The control map of the cvec modes, and the strength its vectors are
    /// added with.
    pub control: Option<(Projector, f32)>,
    /// Called with (pairs scored, pairs) after each pair.
    pub progress: Option<fn(usize, usize)>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModeScore {
    /// Mean NLL per reply token (nats).
    pub nll: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Everything `eval-conditioning` reports (its `--json` object).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub n: usize,
    pub gguf: String,
    pub projector: String,
    pub modes: BTreeMap<&'static str, ModeScore>,
    pub paired: BTreeMap<String, Interval>,
}

/// One pair's reply NLL (summed) under each mode, and its reply length.
#[derive(Debug, Clone)]
pub struct PairScores {
    pub nll: BTreeMap<EvalMode, f64>,
    pub tokens: usize,
}

/// `n` pairs drawn from `pairs` with `seed` (all of them, shuffled, when
/// there are no more than `n`).
pub fn sample(pairs: &[Pair], n: usize, seed: u64) -> Vec<Pair> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked = pairs.to_vec();
    picked.shuffle(&mut rng);
    picked.truncate(n);
    picked
}

/// The world model's conditioning vector of each pair's context (one
/// batched pass).
pub fn context_vectors(world: &WorldModel, pairs: &[Pair]) -> Result<Vec<Vec<f32>>, WorldError> {
    let contexts: Vec<&str> = pairs.iter().map(|p| p.context.as_str()).collect();
    Ok(world
        .condition_batch(&contexts)?
        .into_iter()
        .map(|c| c.vector)
        .collect())
}

/// A permutation of `0..n` with no fixed point (for n >= 2): each pair gets
/// another pair's vector.
pub fn derangement(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x005e_ed0f_de7a);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let mut out = vec![0; n];
    // A cycle through a random order: order[k] takes order[k + 1]'s vector.
    for k in 0..n {
        out[order[k]] = order[(k + 1) % n];
    }
    out
}

/// What each mode puts before the user turn of pair `i`, and the control
/// vector it adds.
fn steer(
    mode: EvalMode,
    i: usize,
    ctx: &Steers<'_>,
) -> Result<(Steer, Option<ControlVector>), EvalError> {
    let vector = |j: usize| Conditioning {
        vector: ctx.vectors[j].clone(),
        world_tokens: 0,
        ablated: false,
    };
    let text = |c: Conditioning| Steer {
        mode: CondMode::Text,
        format: ctx.format,
        conditioning: Some(c),
        rows: None,
        control: None,
        world_time: Default::default(),
    };
    let prefix = |v: &[f32]| -> Result<Steer, EngineError> {
        let projector = ctx.engine.prefix_projector()?;
        Ok(Steer {
            mode: CondMode::Prefix,
            format: ctx.format,
            conditioning: None,
            rows: Some(projector.project(v)?),
            control: None,
            world_time: Default::default(),
        })
    };
    let none = || Steer {
        mode: CondMode::None,
        format: ctx.format,
        conditioning: None,
        rows: None,
        control: None,
        world_time: Default::default(),
    };
    let control = |j: usize| -> Result<_, EvalError> {
        let (map, strength) = ctx.control.ok_or(EvalError::NoControl)?;
        Ok((none(), Some(map.control(&ctx.vectors[j], *strength)?)))
    };
    if mode == EvalMode::Cvec {
        return control(i);
    }
    if mode == EvalMode::MismatchedCvec {
        return control(ctx.other[i]);
    }
    Ok((
        match mode {
            EvalMode::None => none(),
            EvalMode::Text => text(vector(i)),
            EvalMode::MismatchedText => text(vector(ctx.other[i])),
            EvalMode::Prefix => prefix(&ctx.vectors[i])?,
            EvalMode::MismatchedPrefix => prefix(&ctx.vectors[ctx.other[i]])?,
            EvalMode::MeanPrefix => prefix(ctx.mean)?,
            EvalMode::OraclePrefix => prefix(&ctx.oracle[i])?,
            EvalMode::Cvec | EvalMode::MismatchedCvec => unreachable!("returned above"),
        },
        None,
    ))
}

struct Steers<'a> {
    engine: &'a Engine,
    vectors: &'a [Vec<f32>],
    other: &'a [usize],
    mean: &'a [f32],
    /// `bridge(encoder(reply))` per pair; empty unless the oracle is scored.
    oracle: &'a [Vec<f32>],
    modes: &'a [EvalMode],
    format: CondFormat,
    control: Option<&'a (Projector, f32)>,
}

/// The chat prompt and continuation that pair `pair` is scored with under
/// `mode` (exposed so that tests can score the same thing directly).
pub fn score_request(
    engine: &Engine,
    steer: &Steer,
    control: Option<ControlVector>,
    pair: &Pair,
    end_of_turn: &str,
) -> ScoreRequest {
    let conversation = vec![ChatMessage::new(Role::User, pair.context.as_str())];
    ScoreRequest {
        prompt: engine.apply(steer, conversation),
        continuation: format!("{}{end_of_turn}", pair.next),
        cancel: None,
        control,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("pair {pair}: {source}")]
    Score { pair: usize, source: DecoderError },
    #[error("eval-conditioning needs at least 2 pairs (for the mismatched modes); got {0}")]
    TooFew(usize),
    #[error("the cvec modes need a control map: pass --control FILE (made by `tofy fit-control`)")]
    NoControl,
    #[error(transparent)]
    Projector(#[from] ProjectorError),
}

/// Scores every pair under every mode. `end_of_turn` is appended to each
/// reply (the chat template's end-of-turn text, e.g. `<|im_end|>`).
pub fn score_pairs(
    engine: &Engine,
    pairs: &[Pair],
    end_of_turn: &str,
    options: &EvalOptions,
) -> Result<Vec<PairScores>, EvalError> {
    if pairs.len() < 2 {
        return Err(EvalError::TooFew(pairs.len()));
    }
    if options.control.is_none() && options.modes.iter().any(|m| m.needs_control()) {
        return Err(EvalError::NoControl);
    }
    let vectors = context_vectors(engine.world(), pairs).map_err(EngineError::from)?;
    let width = vectors[0].len();
    let mut mean = vec![0.0f32; width];
    for v in &vectors {
        for (m, x) in mean.iter_mut().zip(v) {
            *m += x / vectors.len() as f32;
        }
    }
    let oracle: Vec<Vec<f32>> = if options.modes.contains(&EvalMode::OraclePrefix) {
        let replies: Vec<&str> = pairs.iter().map(|p| p.next.as_str()).collect();
        engine
            .world()
            .encode_as_conditioning(&replies)
            .map_err(EngineError::from)?
            .into_iter()
            .map(|c| c.vector)
            .collect()
    } else {
        Vec::new()
    };
    let other = derangement(pairs.len(), options.seed);
    let ctx = Steers {
        engine,
        vectors: &vectors,
        other: &other,
        mean: &mean,
        oracle: &oracle,
        modes: &options.modes,
        format: options.format,
        control: options.control.as_ref(),
    };
    let results: Mutex<Vec<Option<PairScores>>> = Mutex::new(vec![None; pairs.len()]);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failure: Mutex<Option<EvalError>> = Mutex::new(None);
    // Workers take whole pairs, so one pair's modes run back to back in
    // one sequence and share what prefix they share.
    std::thread::scope(|s| {
        for _ in 0..options.parallel.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= pairs.len() || failure.lock().expect("lock").is_some() {
                        return;
                    }
                    match score_pair(&ctx, i, &pairs[i], end_of_turn) {
                        Ok(scores) => {
                            results.lock().expect("lock")[i] = Some(scores);
                            let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if let Some(progress) = &options.progress {
                                progress(finished, pairs.len());
                            }
                        }
                        Err(err) => {
                            failure.lock().expect("lock").get_or_insert(err);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(err) = failure.into_inner().expect("lock") {
        return Err(err);
    }
    Ok(results
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|r| r.expect("every pair scored"))
        .collect())
}

fn score_pair(
    ctx: &Steers<'_>,
    i: usize,
    pair: &Pair,
    end_of_turn: &str,
) -> Result<PairScores, EvalError> {
    let mut nll = BTreeMap::new();
    let mut tokens = 0;
    for &mode in ctx.modes {
        let (steer, control) = steer(mode, i, ctx)?;
        let request = score_request(ctx.engine, &steer, control, pair, end_of_turn);
        let score = ctx
            .engine
            .decoder()
            .score(&request)
            .map_err(|source| EvalError::Score { pair: i, source })?;
        tokens = score.tokens.len();
        nll.insert(mode, -score.logprobs.iter().sum::<f64>());
    }
    Ok(PairScores { nll, tokens })
}

/// The report of scored pairs: each mode's NLL per token, and each paired
/// difference with its percentile bootstrap interval (95%).
pub fn report(
    scores: &[PairScores],
    options: &EvalOptions,
    gguf: String,
    projector: String,
) -> EvalReport {
    let total_tokens: usize = scores.iter().map(|s| s.tokens).sum();
    let modes = options
        .modes
        .iter()
        .map(|&m| {
            let nll: f64 = scores.iter().map(|s| s.nll[&m]).sum();
            (
                m.name(),
                ModeScore {
                    nll: nll / total_tokens as f64,
                    tokens: total_tokens,
                },
            )
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed.wrapping_add(1));
    let draws: Vec<Vec<usize>> = (0..options.resamples)
        .map(|_| {
            (0..scores.len())
                .map(|_| rng.random_range(0..scores.len()))
                .collect()
        })
        .collect();
    let paired = PAIRED
        .iter()
        .filter(|(a, b)| options.modes.contains(a) && options.modes.contains(b))
        .map(|&(a, b)| {
            let diff = |idx: &mut dyn Iterator<Item = usize>| {
                let (mut d, mut t) = (0.0, 0usize);
                for i in idx {
                    d += scores[i].nll[&a] - scores[i].nll[&b];
                    t += scores[i].tokens;
                }
                d / t as f64
            };
            let mean = diff(&mut (0..scores.len()));
            let mut boot: Vec<f64> = draws.iter().map(|d| diff(&mut d.iter().copied())).collect();
            boot.sort_by(f64::total_cmp);
            let at = |q: f64| boot[((boot.len() - 1) as f64 * q).round() as usize];
            let interval = if boot.is_empty() {
                Interval {
                    mean,
                    lo: mean,
                    hi: mean,
                }
            } else {
                Interval {
                    mean,
                    lo: at(0.025),
                    hi: at(0.975),
                }
            };
            (format!("{}-{}", a.name(), b.name()), interval)
        })
        .collect();
    EvalReport {
        n: scores.len(),
        gguf,
        projector,
        modes,
        paired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derangement_never_keeps_a_pair_its_own_vector() {
        for n in 2..40 {
            for seed in 0..5 {
                let d = derangement(n, seed);
                assert!(d.iter().enumerate().all(|(i, &j)| i != j), "{n} {seed}");
                let mut sorted = d.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation");
            }
        }
    }

    #[test]
    fn paired_differences_are_token_weighted_and_bracketed() {
        let pair = |none: f64, text: f64, tokens: usize| PairScores {
            nll: EvalMode::ALL
                .iter()
                .map(|&m| (m, if m == EvalMode::Text { text } else { none }))
                .collect(),
            tokens,
        };
        let scores = vec![pair(10.0, 8.0, 4), pair(6.0, 6.0, 2), pair(9.0, 5.0, 4)];
        let options = EvalOptions {
            modes: EvalMode::ALL.to_vec(),
            seed: 0,
            resamples: 2000,
            parallel: 1,
            format: CondFormat::Chunks,
            control: None,
            progress: None,
        };
        let r = report(&scores, &options, "g".into(), "p".into());
        assert!((r.modes["none"].nll - 25.0 / 10.0).abs() < 1e-12);
        assert!((r.modes["text"].nll - 19.0 / 10.0).abs() < 1e-12);
        let d = r.paired["text-none"];
        assert!((d.mean + 0.6).abs() < 1e-12, "{d:?}");
        assert!(d.lo <= d.mean && d.mean <= d.hi && d.hi <= 0.0, "{d:?}");
        assert_eq!(r.paired["prefix-none"].mean, 0.0);

        let only = EvalOptions {
            modes: vec![EvalMode::None, EvalMode::Text],
            ..options
        };
        let r = report(&scores, &only, "g".into(), "p".into());
        assert_eq!(
            r.modes.keys().copied().collect::<Vec<_>>(),
            ["none", "text"]
        );
        assert_eq!(r.paired.keys().collect::<Vec<_>>(), ["text-none"]);
    }
}
