//! `tofy eval-conditioning`: does the world model's conditioning make the
//! decoder expect the true reply?
//!
//! For each `context<TAB>reply` pair, the decoder scores the true reply
//! (teacher-forced, the end-of-turn token included) after the same chat
//! prompt, `[conditioning message] user: context`, under each [`EvalMode`].
//! The mismatched modes use the vector of another pair (a derangement:
//! never the pair's own), the mean mode the mean vector of the pairs
//! evaluated, so that a gain can be told apart from what any conditioning
//! message or any steer does; the instruction mode (the message with
//! nothing in it) and the soft prompt (one trained set of rows for every
//! pair) are the baselines a world vector must beat. Differences between
//! modes are paired (same pairs, same reply tokens) with a percentile
//! bootstrap that resamples whole conversations when the pairs' ids are
//! known (pairs of one dialogue are not independent), pairs otherwise.
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

use crate::conditioning::{CondFormat, CondMode, Conditioning, system_message};
use crate::data::pairs::Pair;
use crate::decoder::ControlVector;
use crate::decoder::{ChatMessage, DecoderError, Embeddings, Prompt, Role, ScoreRequest};
use crate::engine::{Engine, EngineError, Steer, with_conditioning};
use crate::projector::{Projector, ProjectorError};
use crate::world::{WorldError, WorldModel};

/// What the decoder sees before the user turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum EvalMode {
    /// No conditioning message.
    None,
    /// The conditioning message's instruction with neither digits nor rows:
    /// what the sentence alone does.
    Instruction,
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
    /// The constant rows of a soft prompt (`--soft-prompt`, a projector
    /// trained with `train-projector --bias-only`): the best steer with
    /// nothing specific to the pair, under the same training budget.
    SoftPrompt,
    /// The projector's rows of `bridge(encoder(true reply))`: what a
    /// perfect transition would predict, an upper bound on what the channel
    /// carries (it reads the answer, so it is never a mode to serve).
    OraclePrefix,
    /// The oracle projector's rows (`--oracle-projector`, trained with
    /// `train-projector --vectors oracle`) of `bridge(encoder(true reply))`:
    /// what a perfect prediction gives through K rows, the channel's
    /// capacity (it reads the answer).
    Oracle,
    /// The oracle projector's rows of another pair's reply latent.
    MismatchedOracle,
    /// No message; the control map's vector of the pair's own world vector
    /// added to the residual stream (`--control`).
    Cvec,
    /// The same with another pair's vector.
    MismatchedCvec,
}

impl EvalMode {
    pub const ALL: [Self; 13] = [
        Self::None,
        Self::Instruction,
        Self::Text,
        Self::MismatchedText,
        Self::Prefix,
        Self::MismatchedPrefix,
        Self::MeanPrefix,
        Self::SoftPrompt,
        Self::OraclePrefix,
        Self::Oracle,
        Self::MismatchedOracle,
        Self::Cvec,
        Self::MismatchedCvec,
    ];

    /// Whether the mode needs a control map.
    pub fn needs_control(self) -> bool {
        matches!(self, Self::Cvec | Self::MismatchedCvec)
    }

    /// Whether the mode needs a soft prompt (`--soft-prompt`).
    pub fn needs_soft_prompt(self) -> bool {
        self == Self::SoftPrompt
    }

    /// Whether the mode needs an oracle projector (`--oracle-projector`).
    pub fn needs_oracle_projector(self) -> bool {
        matches!(self, Self::Oracle | Self::MismatchedOracle)
    }

    /// Whether the mode reads the true reply's latent.
    fn reads_reply(self) -> bool {
        matches!(
            self,
            Self::OraclePrefix | Self::Oracle | Self::MismatchedOracle
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Instruction => "instruction",
            Self::Text => "text",
            Self::MismatchedText => "mismatched_text",
            Self::Prefix => "prefix",
            Self::MismatchedPrefix => "mismatched_prefix",
            Self::MeanPrefix => "mean_prefix",
            Self::SoftPrompt => "soft_prompt",
            Self::OraclePrefix => "oracle_prefix",
            Self::Oracle => "oracle",
            Self::MismatchedOracle => "mismatched_oracle",
            Self::Cvec => "cvec",
            Self::MismatchedCvec => "mismatched_cvec",
        }
    }
}

/// The differences reported, `a - b`: negative means `a` expects the true
/// reply more. Only those whose two modes were both scored are reported.
pub const PAIRED: [(EvalMode, EvalMode); 20] = [
    (EvalMode::Prefix, EvalMode::None),
    (EvalMode::Prefix, EvalMode::MismatchedPrefix),
    (EvalMode::Prefix, EvalMode::MeanPrefix),
    (EvalMode::Prefix, EvalMode::SoftPrompt),
    (EvalMode::Prefix, EvalMode::Instruction),
    (EvalMode::SoftPrompt, EvalMode::None),
    (EvalMode::SoftPrompt, EvalMode::Instruction),
    (EvalMode::Instruction, EvalMode::None),
    (EvalMode::Text, EvalMode::None),
    (EvalMode::Text, EvalMode::Instruction),
    (EvalMode::Text, EvalMode::MismatchedText),
    // The default mode's choice (issue 24 rung 5).
    (EvalMode::Prefix, EvalMode::Text),
    (EvalMode::OraclePrefix, EvalMode::None),
    (EvalMode::OraclePrefix, EvalMode::MismatchedPrefix),
    (EvalMode::Oracle, EvalMode::SoftPrompt),
    (EvalMode::Oracle, EvalMode::MismatchedOracle),
    (EvalMode::Oracle, EvalMode::None),
    (EvalMode::Prefix, EvalMode::Oracle),
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
    /// The soft prompt of the `soft_prompt` mode: a projector whose rows
    /// of the zero vector (its constant part; all of it for one trained
    /// with `--bias-only`) are used for every pair.
    pub soft_prompt: Option<Projector>,
    /// The projector of the `oracle` modes (trained on reply latents).
    pub oracle_projector: Option<Projector>,
    /// What the world model reads for each pair, in the pairs' order, in
    /// place of the pair's context (the conversation so far; the decoder's
    /// user turn stays the pair's context).
    pub world_contexts: Option<Vec<String>>,
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
    /// The soft prompt's file, when the `soft_prompt` mode was scored.
    pub soft_prompt: Option<String>,
    /// The oracle projector's file, when the `oracle` modes were scored.
    pub oracle_projector: Option<String>,
    /// `(soft_prompt - prefix) / (soft_prompt - oracle)`: the fraction of
    /// what a perfect prediction adds over the best constant that the world
    /// model's prediction reaches, when all three were scored and the
    /// oracle beats the soft prompt (otherwise there is no capacity to
    /// reach and the ratio means nothing: `None`). The interval comes from
    /// the same resamples; it is wide when the denominator is near 0.
    pub capacity_reached: Option<Interval>,
    /// What the bootstrap resamples: `conversations` or `pairs`.
    pub bootstrap: &'static str,
    /// The conversations the pairs come from (= `n` for `pairs`).
    pub conversations: usize,
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
    sample_indices(pairs.len(), n, seed)
        .into_iter()
        .map(|i| pairs[i].clone())
        .collect()
}

/// The indices [`sample`] picks from `len` pairs (the pairs' places in
/// their file, for per-pair output and conversation ids).
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked: Vec<usize> = (0..len).collect();
    picked.shuffle(&mut rng);
    picked.truncate(n);
    picked
}

/// The world model's conditioning vector of each pair's context (one
/// batched pass).
pub fn context_vectors(world: &WorldModel, pairs: &[Pair]) -> Result<Vec<Vec<f32>>, WorldError> {
    let contexts: Vec<&str> = pairs.iter().map(|p| p.context.as_str()).collect();
    world_vectors(world, &contexts)
}

/// The world model's conditioning vector of each text (one batched pass).
pub fn world_vectors<S: AsRef<str>>(
    world: &WorldModel,
    texts: &[S],
) -> Result<Vec<Vec<f32>>, WorldError> {
    let texts: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
    Ok(world
        .condition_batch(&texts)?
        .into_iter()
        .map(|c| c.vector)
        .collect())
}

/// `bridge(encoder(reply))` of each pair: the vector a perfect transition
/// would predict (the oracle modes' input; one batched pass).
pub fn reply_vectors(world: &WorldModel, pairs: &[Pair]) -> Result<Vec<Vec<f32>>, WorldError> {
    let replies: Vec<&str> = pairs.iter().map(|p| p.next.as_str()).collect();
    Ok(world
        .encode_as_conditioning(&replies)?
        .into_iter()
        .map(|c| c.vector)
        .collect())
}

/// The mean of `vectors` (all of one width): `mean_prefix`'s vector, and
/// where a soft prompt starts.
pub fn mean_vector(vectors: &[Vec<f32>]) -> Vec<f32> {
    let mut mean = vec![0.0f32; vectors.first().map_or(0, Vec::len)];
    for v in vectors {
        for (m, x) in mean.iter_mut().zip(v) {
            *m += x / vectors.len() as f32;
        }
    }
    mean
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
    let steer =
        |mode: CondMode, conditioning: Option<Conditioning>, rows: Option<Embeddings>| Steer {
            mode,
            format: ctx.format,
            conditioning,
            rows,
            control: None,
            world_time: Default::default(),
        };
    let text = |j: usize| {
        let vector = Conditioning {
            vector: ctx.vectors[j].clone(),
            world_tokens: 0,
            ablated: false,
        };
        steer(CondMode::Text, Some(vector), None)
    };
    // The rows a projector makes of `v`, as the prefix.
    let rows = |projector: &Projector, v: &[f32]| -> Result<Steer, EvalError> {
        Ok(steer(CondMode::Prefix, None, Some(projector.project(v)?)))
    };
    let prefix = |v: &[f32]| rows(ctx.engine.prefix_projector()?, v);
    let oracle = |v: &[f32]| rows(ctx.oracle_projector.ok_or(EvalError::NoOracleProjector)?, v);
    let control = |j: usize| -> Result<_, EvalError> {
        let (map, strength) = ctx.control.ok_or(EvalError::NoControl)?;
        Ok(Some(map.control(&ctx.vectors[j], *strength)?))
    };
    let none = || steer(CondMode::None, None, None);
    Ok(match mode {
        EvalMode::None => (none(), None),
        EvalMode::Text => (text(i), None),
        EvalMode::MismatchedText => (text(ctx.other[i]), None),
        EvalMode::Prefix => (prefix(&ctx.vectors[i])?, None),
        EvalMode::MismatchedPrefix => (prefix(&ctx.vectors[ctx.other[i]])?, None),
        EvalMode::MeanPrefix => (prefix(ctx.mean)?, None),
        EvalMode::SoftPrompt => {
            let soft = ctx.soft_rows.ok_or(EvalError::NoSoftPrompt)?;
            (steer(CondMode::Prefix, None, Some(soft.clone())), None)
        }
        EvalMode::OraclePrefix => (prefix(&ctx.oracle[i])?, None),
        EvalMode::Oracle => (oracle(&ctx.oracle[i])?, None),
        EvalMode::MismatchedOracle => (oracle(&ctx.oracle[ctx.other[i]])?, None),
        EvalMode::Cvec => (none(), control(i)?),
        EvalMode::MismatchedCvec => (none(), control(ctx.other[i])?),
        // `score_pair` lays the instruction out itself: it has no steer.
        EvalMode::Instruction => unreachable!("score_pair handles the instruction mode"),
    })
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
    /// The soft prompt's rows, the same for every pair.
    soft_rows: Option<&'a Embeddings>,
    oracle_projector: Option<&'a Projector>,
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

/// The `instruction` mode's prompt: the conditioning message with nothing
/// after "Latent condition:", right before the user turn. Its tokens are
/// the `prefix` mode's with the rows taken out.
pub fn instruction_prompt(pair: &Pair) -> Prompt {
    let conversation = vec![ChatMessage::new(Role::User, pair.context.as_str())];
    Prompt::chat(with_conditioning(conversation, system_message("")))
}

/// The rows a soft prompt puts before every user turn: its rows of the
/// zero vector.
pub fn soft_prompt_rows(soft: &Projector) -> Result<Embeddings, ProjectorError> {
    soft.project(&vec![0.0; soft.bridge_dim()])
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
    #[error(
        "the soft_prompt mode needs a soft prompt: pass --soft-prompt FILE (made by `tofy train-projector --bias-only`)"
    )]
    NoSoftPrompt,
    #[error(
        "the oracle modes need an oracle projector: pass --oracle-projector FILE (made by `tofy train-projector --vectors oracle`)"
    )]
    NoOracleProjector,
    #[error(
        "pair {pair}: the reply was {a} tokens under one mode and {b} under another; the modes cannot be compared"
    )]
    TokenMismatch { pair: usize, a: usize, b: usize },
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
    let soft_rows = match &options.soft_prompt {
        Some(soft) if options.modes.contains(&EvalMode::SoftPrompt) => {
            Some(soft_prompt_rows(soft)?)
        }
        _ if options.modes.contains(&EvalMode::SoftPrompt) => {
            return Err(EvalError::NoSoftPrompt);
        }
        _ => None,
    };
    if options.oracle_projector.is_none()
        && options.modes.iter().any(|m| m.needs_oracle_projector())
    {
        return Err(EvalError::NoOracleProjector);
    }
    let vectors = match &options.world_contexts {
        Some(contexts) => {
            assert_eq!(contexts.len(), pairs.len(), "one world context per pair");
            world_vectors(engine.world(), contexts)
        }
        None => context_vectors(engine.world(), pairs),
    }
    .map_err(EngineError::from)?;
    let mean = mean_vector(&vectors);
    let oracle: Vec<Vec<f32>> = if options.modes.iter().any(|m| m.reads_reply()) {
        reply_vectors(engine.world(), pairs).map_err(EngineError::from)?
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
        soft_rows: soft_rows.as_ref(),
        oracle_projector: options.oracle_projector.as_ref(),
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
    let mut tokens = None;
    for &mode in ctx.modes {
        let request = if mode == EvalMode::Instruction {
            ScoreRequest {
                prompt: instruction_prompt(pair),
                continuation: format!("{}{end_of_turn}", pair.next),
                cancel: None,
                control: None,
            }
        } else {
            let (steer, control) = steer(mode, i, ctx)?;
            score_request(ctx.engine, &steer, control, pair, end_of_turn)
        };
        let score = ctx
            .engine
            .decoder()
            .score(&request)
            .map_err(|source| EvalError::Score { pair: i, source })?;
        // The reply is tokenized apart from the prompt: the same under
        // every mode, which the token-weighted means rely on.
        match tokens {
            Some(n) if n != score.tokens.len() => {
                return Err(EvalError::TokenMismatch {
                    pair: i,
                    a: n,
                    b: score.tokens.len(),
                });
            }
            _ => tokens = Some(score.tokens.len()),
        }
        nll.insert(mode, -score.logprobs.iter().sum::<f64>());
    }
    Ok(PairScores {
        nll,
        tokens: tokens.unwrap_or(0),
    })
}

/// The report of scored pairs: each mode's NLL per token, and each paired
/// difference with its percentile bootstrap interval (95%). With
/// `conversations` (each scored pair's conversation id) the bootstrap
/// draws whole conversations (a cluster bootstrap); without, pairs.
pub fn report(
    scores: &[PairScores],
    conversations: Option<&[String]>,
    options: &EvalOptions,
    gguf: String,
    projector: String,
) -> EvalReport {
    // Each cluster's pairs, in order of first appearance.
    let clusters: Vec<Vec<usize>> = match conversations {
        Some(ids) => {
            assert_eq!(ids.len(), scores.len(), "one conversation id per pair");
            let mut index: BTreeMap<&str, usize> = BTreeMap::new();
            let mut clusters: Vec<Vec<usize>> = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let at = *index.entry(id.as_str()).or_insert_with(|| {
                    clusters.push(Vec::new());
                    clusters.len() - 1
                });
                clusters[at].push(i);
            }
            clusters
        }
        None => (0..scores.len()).map(|i| vec![i]).collect(),
    };
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
            (0..clusters.len())
                .flat_map(|_| {
                    clusters[rng.random_range(0..clusters.len())]
                        .iter()
                        .copied()
                })
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
            (
                format!("{}-{}", a.name(), b.name()),
                percentile_interval(mean, &boot),
            )
        })
        .collect();
    let has = |m: EvalMode| options.modes.contains(&m);
    let total = |m: EvalMode| scores.iter().map(|s| s.nll[&m]).sum::<f64>();
    let capacity_reached = (has(EvalMode::SoftPrompt)
        && has(EvalMode::Prefix)
        && has(EvalMode::Oracle)
        && total(EvalMode::Oracle) < total(EvalMode::SoftPrompt))
    .then(|| {
        // Token-weighted sums, as every difference here.
        let ratio = |idx: &mut dyn Iterator<Item = usize>| {
            let (mut reached, mut capacity) = (0.0, 0.0);
            for i in idx {
                let n = &scores[i].nll;
                reached += n[&EvalMode::SoftPrompt] - n[&EvalMode::Prefix];
                capacity += n[&EvalMode::SoftPrompt] - n[&EvalMode::Oracle];
            }
            reached / capacity
        };
        let mean = ratio(&mut (0..scores.len()));
        let mut boot: Vec<f64> = draws
            .iter()
            .map(|d| ratio(&mut d.iter().copied()))
            .collect();
        boot.sort_by(f64::total_cmp);
        percentile_interval(mean, &boot)
    });
    EvalReport {
        n: scores.len(),
        gguf,
        projector,
        soft_prompt: options.soft_prompt.as_ref().map(|p| p.source().to_string()),
        oracle_projector: options
            .oracle_projector
            .as_ref()
            .map(|p| p.source().to_string()),
        capacity_reached,
        bootstrap: if conversations.is_some() {
            "conversations"
        } else {
            "pairs"
        },
        conversations: clusters.len(),
        modes,
        paired,
    }
}

/// `mean` with the 2.5% and 97.5% points of the sorted bootstrap `boot`
/// (the mean alone when there are no resamples).
fn percentile_interval(mean: f64, boot: &[f64]) -> Interval {
    if boot.is_empty() {
        return Interval {
            mean,
            lo: mean,
            hi: mean,
        };
    }
    let at = |q: f64| boot[((boot.len() - 1) as f64 * q).round() as usize];
    Interval {
        mean,
        lo: at(0.025),
        hi: at(0.975),
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
            soft_prompt: None,
            oracle_projector: None,
            world_contexts: None,
            progress: None,
        };
        let r = report(&scores, None, &options, "g".into(), "p".into());
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
        let r = report(&scores, None, &only, "g".into(), "p".into());
        assert_eq!(
            r.modes.keys().copied().collect::<Vec<_>>(),
            ["none", "text"]
        );
        assert_eq!(r.paired.keys().collect::<Vec<_>>(), ["text-none"]);
    }

    #[test]
    fn the_cluster_bootstrap_keeps_conversations_whole_and_widens_correlated_intervals() {
        // Two conversations of three pairs each: within one the difference
        // is the same, between them it differs. Pairs would pretend to six
        // independent draws; conversations are two.
        let pair = |text: f64| PairScores {
            nll: [(EvalMode::None, 10.0), (EvalMode::Text, text)]
                .into_iter()
                .collect(),
            tokens: 5,
        };
        let scores: Vec<PairScores> = [8.0, 8.0, 8.0, 11.0, 11.0, 11.0].map(pair).to_vec();
        let ids: Vec<String> = ["a", "a", "a", "b", "b", "b"].map(String::from).to_vec();
        let options = EvalOptions {
            modes: vec![EvalMode::None, EvalMode::Text],
            seed: 3,
            resamples: 4000,
            parallel: 1,
            format: CondFormat::Chunks,
            control: None,
            soft_prompt: None,
            oracle_projector: None,
            world_contexts: None,
            progress: None,
        };
        let by_pair = report(&scores, None, &options, "g".into(), "p".into());
        let by_talk = report(&scores, Some(&ids), &options, "g".into(), "p".into());
        assert_eq!((by_pair.bootstrap, by_pair.conversations), ("pairs", 6));
        assert_eq!(
            (by_talk.bootstrap, by_talk.conversations),
            ("conversations", 2)
        );
        let (p, c) = (by_pair.paired["text-none"], by_talk.paired["text-none"]);
        assert_eq!(p.mean, c.mean, "the point estimate does not change");
        assert!(c.hi - c.lo > p.hi - p.lo, "{p:?} vs {c:?}");
        // A draw of whole conversations gives one of three means: all a,
        // all b, or half and half.
        for bound in [c.lo, c.hi] {
            assert!(
                [-0.4, 0.2, -0.1].iter().any(|m| (bound - m).abs() < 1e-9),
                "{bound}"
            );
        }
    }
}
