//! A projector trained by gradient through the frozen decoder (issue 13,
//! item 4b): `tofy train-projector`.
//!
//! The closed-form fit (`fit_projector`) regresses the world vector onto
//! mean reply-token rows, a target that only stands in for what matters.
//! This trains the projector on what matters: the decoder's NLL of the true
//! reply after the prompt with the projector's rows in it, exactly the
//! `prefix` mode that `eval-conditioning` scores. The decoder is the
//! [`FrozenLlama`]; only the projector's weight and bias move.
//!
//! Every prompt opens with the same text (the chat template's system turn up
//! to the rows), so its keys and values are computed once
//! ([`SharedPrefix`]) and each step runs only the rows, the user turn and
//! the reply.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::TrainError;
use super::adam::{Adam, AdamParams};
use super::llama::{FrozenLlama, SharedPrefix, mean_nll};
use super::run::{self, RunMeta};
use crate::conditioning::CondMode;
use crate::data::pairs::Pair;
use crate::decoder::{Embeddings, Segment};
use crate::engine::{Engine, Steer};
use crate::projector::Projector;
use crate::world::checkpoint::{self, Checkpoint, TensorData};

/// One pair, ready for the decoder: its world vector, the tokens between
/// the rows and the reply (the user turn, the assistant header), and the
/// reply's tokens (the end-of-turn token included).
#[derive(Debug, Clone)]
pub struct Example {
    pub pair: Pair,
    pub vector: Vec<f32>,
    pub after_rows: Vec<u32>,
    pub reply: Vec<u32>,
}

/// The prompts of `pairs` in prefix mode with K rows, as the decoder lays
/// them out: the tokens before the rows (the same for every pair, checked),
/// and each pair's [`Example`]. Pairs whose rows-to-end length exceeds
/// `max_tokens` are left out (counted in the third value).
pub fn examples(
    engine: &Engine,
    pairs: &[Pair],
    vectors: &[Vec<f32>],
    k: usize,
    end_of_turn: &str,
    max_tokens: usize,
) -> anyhow::Result<(Vec<u32>, Vec<Example>, usize)> {
    use anyhow::Context;
    let decoder = engine.decoder();
    let width = decoder
        .input_width()
        .context("train-projector needs the llama backend (embedding input)")?;
    // The layout depends on how many rows there are, not on their values.
    let placeholder = Embeddings::new(vec![0.0; k * width], width)?;
    let steer = Steer {
        mode: CondMode::Prefix,
        format: engine.format(),
        conditioning: None,
        rows: Some(placeholder),
        control: None,
        world_time: Default::default(),
    };
    let ids = |v: &[i32]| v.iter().map(|&t| t as u32).collect::<Vec<u32>>();
    let mut before: Option<Vec<u32>> = None;
    let mut out = Vec::with_capacity(pairs.len());
    let mut skipped = 0;
    for (pair, vector) in pairs.iter().zip(vectors) {
        let request =
            crate::eval_conditioning::score_request(engine, &steer, None, pair, end_of_turn);
        let segments = decoder.layout(&request.prompt)?;
        let [
            Segment::Tokens(pre),
            Segment::Embeddings(rows),
            Segment::Tokens(post),
        ] = segments.as_slice()
        else {
            anyhow::bail!(
                "the prompt is not tokens, rows, tokens (the chat template put the conditioning message elsewhere)"
            );
        };
        anyhow::ensure!(
            rows.n_rows() == k,
            "the prompt holds {} rows, not {k}",
            rows.n_rows()
        );
        match &before {
            None => before = Some(ids(pre)),
            Some(b) => anyhow::ensure!(
                *b == ids(pre),
                "the prompts differ before the rows; they cannot share one prefix"
            ),
        }
        let reply = ids(&decoder.tokenize(&request.continuation, false)?);
        if reply.is_empty() || k + post.len() + reply.len() > max_tokens {
            skipped += 1;
            continue;
        }
        out.push(Example {
            pair: pair.clone(),
            vector: vector.clone(),
            after_rows: ids(post),
            reply,
        });
    }
    let before = before.context("no pairs")?;
    Ok((before, out, skipped))
}

/// The decoder's log-probabilities of each example's reply after its rows.
pub struct ReplyScorer<'a> {
    model: &'a FrozenLlama,
    prefix: SharedPrefix,
}

impl<'a> ReplyScorer<'a> {
    /// `before` is the token run every prompt opens with.
    pub fn new(model: &'a FrozenLlama, before: &[u32]) -> candle_core::Result<Self> {
        Ok(Self {
            prefix: model.shared_prefix(before)?,
            model,
        })
    }

    /// The log-probability of every reply token, the examples' in order,
    /// given `rows` `[batch, K, n_embd]` (K may be 0 for no rows).
    pub fn reply_log_probs(
        &self,
        rows: &Tensor,
        batch: &[&Example],
    ) -> candle_core::Result<Tensor> {
        let (log_probs, targets) = self.log_probs_and_targets(rows, batch)?;
        let targets = Tensor::new(targets.as_slice(), log_probs.device())?.unsqueeze(1)?;
        log_probs.gather(&targets, 1)?.squeeze(1)
    }

    /// The mean NLL per reply token over the batch (token-weighted, as
    /// eval-conditioning reports it).
    pub fn loss(&self, rows: &Tensor, batch: &[&Example]) -> candle_core::Result<Tensor> {
        let (log_probs, targets) = self.log_probs_and_targets(rows, batch)?;
        mean_nll(&log_probs, &targets)
    }

    fn log_probs_and_targets(
        &self,
        rows: &Tensor,
        batch: &[&Example],
    ) -> candle_core::Result<(Tensor, Vec<u32>)> {
        let k = rows.dim(1)?;
        if let Some(e) = batch.iter().find(|e| e.reply.is_empty()) {
            candle_core::bail!("the reply of pair '{}' has no tokens", e.pair.context);
        }
        // Each sequence reads its rows, the tokens after them and the reply
        // but its last token, right-padded (the causal mask keeps padding
        // out of every real position).
        let inputs: Vec<Vec<u32>> = batch
            .iter()
            .map(|e| {
                let mut t = e.after_rows.clone();
                t.extend_from_slice(&e.reply[..e.reply.len() - 1]);
                t
            })
            .collect();
        let len = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let padded: Vec<u32> = inputs
            .iter()
            .flat_map(|t| {
                t.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, len - t.len()))
            })
            .collect();
        let tokens =
            self.model
                .embed(&padded)?
                .reshape((batch.len(), len, self.model.shape().n_embd))?;
        let x = if k == 0 {
            tokens
        } else {
            Tensor::cat(&[&rows.to_dtype(tokens.dtype())?, &tokens], 1)?
        };
        let hidden = self.model.forward(&x, Some(&self.prefix))?;
        let positions = k + len;
        // Reply token j of sequence b is predicted at the position before it.
        let mut picks = Vec::new();
        let mut targets = Vec::new();
        for (b, e) in batch.iter().enumerate() {
            if k + e.after_rows.len() == 0 {
                candle_core::bail!("an example with no rows and no tokens before its reply");
            }
            let first = b * positions + k + e.after_rows.len() - 1;
            picks.extend((0..e.reply.len()).map(|j| (first + j) as u32));
            targets.extend_from_slice(&e.reply);
        }
        let picks = Tensor::new(picks.as_slice(), hidden.device())?;
        let hidden = hidden
            .reshape((batch.len() * positions, self.model.shape().n_embd))?
            .index_select(&picks, 0)?;
        Ok((self.model.log_probs(&hidden)?, targets))
    }
}

/// Where a trained projector starts (issue 24, rung 1).
#[derive(Debug, Clone)]
pub struct Start {
    /// The vector the weight reads around: the input is `z - centre`, so
    /// the weight carries only what varies between vectors and the constant
    /// lives in the bias alone (the training vectors' mean).
    pub centre: Vec<f32>,
    /// The raw rows (before the row norm) every vector starts with: a soft
    /// prompt's (its bias); `None` for the starting projector's rows of
    /// `centre`.
    pub constant: Option<Vec<f32>>,
    /// Keep the starting projector's weight (the recipe before issue 24)
    /// instead of starting it at 0.
    pub keep_weight: bool,
    /// The weight stays 0 and only the bias trains: a soft prompt.
    pub bias_only: bool,
    /// The weight's learning rate as a multiple of the bias's (see
    /// [`balanced_weight_rate`]).
    pub weight_rate: f64,
}

/// The weight's learning rate, as a multiple of the bias's, at which the
/// weight moves a row no faster than the bias does: the inverse of the mean
/// L1 norm of the centred inputs. Adam moves every parameter by about its
/// learning rate per step, whatever the gradient's scale, and a row moves
/// by the sum of its weights' moves times the input's entries, all with
/// the same sign for one example (the gradient of `W[r][d]` is `g[r] z[d]`).
/// At the bias's rate the weight would move each row about `|z - centre|_1`
/// (~100 for the world model's vectors) times faster than the constant,
/// and the pair-specific part would swamp the rows within a few steps (it
/// did: the first oracle run's validation NLL rose from 3.81 to 4.35 in 20
/// steps).
pub fn balanced_weight_rate(vectors: &[&[f32]], centre: &[f32]) -> f64 {
    let l1: f64 = vectors
        .iter()
        .map(|v| {
            v.iter()
                .zip(centre)
                .map(|(z, c)| f64::from((z - c).abs()))
                .sum::<f64>()
        })
        .sum::<f64>()
        / vectors.len().max(1) as f64;
    if l1 > 0.0 { 1.0 / l1 } else { 1.0 }
}

/// The projector's parameters as candle variables, and its forward map
/// `rows(z) = W (z - centre) + b`, rescaled to the row norm.
pub struct TrainableProjector {
    weight: Var,
    bias: Var,
    centre: Vec<f32>,
    template: Projector,
    /// The weight stays 0 and only the bias trains: a soft prompt, the same
    /// rows for every vector (the constant baseline the world model must beat).
    bias_only: bool,
    weight_rate: f64,
}

impl TrainableProjector {
    /// Starts from `init` (its K, width and row norm are kept) as `start`
    /// says. With `keep_weight` its rows are `init`'s for every vector;
    /// otherwise they start the same for every vector.
    pub fn new(init: &Projector, start: Start) -> candle_core::Result<Self> {
        let (weight, bias) = init.parameters();
        let (rows, dim) = (init.k() * init.n_embd(), init.bridge_dim());
        if start.centre.len() != dim {
            candle_core::bail!(
                "the centre has {} values, the projector reads {dim}",
                start.centre.len()
            );
        }
        if start.keep_weight && (start.bias_only || start.constant.is_some()) {
            candle_core::bail!(
                "the starting weight is kept only with the starting projector's own rows (not with a soft prompt or its constant)"
            );
        }
        // The raw rows of `centre`: with the input centred, the bias that
        // gives the same rows is b + W centre.
        let constant = match start.constant {
            Some(c) if c.len() == rows => c,
            Some(c) => candle_core::bail!("the starting rows have {} values, not {rows}", c.len()),
            None => (0..rows)
                .map(|r| {
                    let w = &weight[r * dim..(r + 1) * dim];
                    bias[r] + w.iter().zip(&start.centre).map(|(a, z)| a * z).sum::<f32>()
                })
                .collect(),
        };
        let weight = if start.keep_weight {
            weight.to_vec()
        } else {
            vec![0.0; rows * dim]
        };
        Ok(Self {
            weight: Var::from_vec(weight, (rows, dim), &Device::Cpu)?,
            bias: Var::from_vec(constant, rows, &Device::Cpu)?,
            centre: start.centre,
            template: init.clone(),
            bias_only: start.bias_only,
            weight_rate: start.weight_rate,
        })
    }

    /// The rows `[batch, K, n_embd]` of `vectors`, as [`Projector::project`]
    /// computes them.
    pub fn rows(&self, vectors: &[&[f32]]) -> candle_core::Result<Tensor> {
        let p = &self.template;
        let flat: Vec<f32> = vectors
            .iter()
            .flat_map(|v| v.iter().zip(&self.centre).map(|(z, c)| z - c))
            .collect();
        let z = Tensor::from_vec(flat, (vectors.len(), p.bridge_dim()), &Device::Cpu)?;
        let rows = z
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?
            .reshape((vectors.len(), p.k(), p.n_embd()))?;
        match p.row_norm() {
            Some(norm) => {
                let l2 = rows.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                rows.broadcast_div(&l2)? * f64::from(norm)
            }
            None => Ok(rows),
        }
    }

    /// What the optimiser moves.
    pub fn vars(&self) -> Vec<Var> {
        self.rated_vars().into_iter().map(|(v, _)| v).collect()
    }

    /// What the optimiser moves, each with its learning rate as a multiple
    /// of the bias's.
    pub fn rated_vars(&self) -> Vec<(Var, f64)> {
        if self.bias_only {
            vec![(self.bias.clone(), 1.0)]
        } else {
            vec![
                (self.weight.clone(), self.weight_rate),
                (self.bias.clone(), 1.0),
            ]
        }
    }

    /// The current parameters as a projector (`source` names it): the
    /// centre folded into the bias (`b - W centre`), so the file is the
    /// seed's format and projects raw vectors.
    pub fn projector(&self, source: String) -> candle_core::Result<Projector> {
        let p = &self.template;
        let weight: Vec<f32> = self.weight.as_tensor().flatten_all()?.to_vec1()?;
        let bias: Vec<f32> = self.bias.as_tensor().to_vec1()?;
        let dim = p.bridge_dim();
        let bias = bias
            .iter()
            .enumerate()
            .map(|(r, b)| {
                let w = &weight[r * dim..(r + 1) * dim];
                b - w.iter().zip(&self.centre).map(|(a, c)| a * c).sum::<f32>()
            })
            .collect();
        Ok(Projector::from_parts(
            weight,
            bias,
            p.k(),
            p.n_embd(),
            dim,
            p.row_norm(),
            p.gguf_name(),
            source,
        ))
    }

    /// The weight and bias as they train (the bias before the centre is
    /// folded in), for a checkpoint.
    fn state(&self) -> (Tensor, Tensor) {
        (
            self.weight.as_tensor().clone(),
            self.bias.as_tensor().clone(),
        )
    }

    fn restore(&self, weight: &Tensor, bias: &Tensor) -> candle_core::Result<()> {
        self.weight.set(weight)?;
        self.bias.set(bias)
    }
}

/// How far the frozen model's reply log-probabilities are from the
/// decoder's own (llama.cpp's `score` of the same prompt, rows and reply):
/// the largest difference on one token, and the largest on one reply's mean
/// NLL, over `batch`.
pub fn agreement(
    engine: &Engine,
    scorer: &ReplyScorer<'_>,
    projector: &Projector,
    batch: &[&Example],
    end_of_turn: &str,
) -> anyhow::Result<Agreement> {
    // Both decoders get the very rows the projector makes, so only the
    // decoders are compared.
    let rows = batch
        .iter()
        .map(|e| projector.project(&e.vector))
        .collect::<Result<Vec<_>, _>>()?;
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.as_slice().to_vec()).collect();
    let stacked = Tensor::from_vec(
        flat,
        (batch.len(), projector.k(), projector.n_embd()),
        &Device::Cpu,
    )?;
    let ours: Vec<f32> = scorer
        .reply_log_probs(&stacked, batch)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let mut agreement = Agreement::default();
    let mut at = 0;
    for (e, rows) in batch.iter().zip(rows) {
        let steer = Steer {
            mode: CondMode::Prefix,
            format: engine.format(),
            conditioning: None,
            rows: Some(rows),
            control: None,
            world_time: Default::default(),
        };
        let request =
            crate::eval_conditioning::score_request(engine, &steer, None, &e.pair, end_of_turn);
        let theirs = engine.decoder().score(&request)?;
        anyhow::ensure!(
            theirs.logprobs.len() == e.reply.len(),
            "the decoder scored {} reply tokens, the frozen model {}",
            theirs.logprobs.len(),
            e.reply.len()
        );
        let mine = &ours[at..at + e.reply.len()];
        at += e.reply.len();
        let mut sum = 0.0;
        for (a, b) in mine.iter().zip(&theirs.logprobs) {
            let d = f64::from(*a) - b;
            agreement.max_token = agreement.max_token.max(d.abs());
            sum += d;
        }
        agreement.max_reply = agreement.max_reply.max((sum / mine.len() as f64).abs());
        agreement.tokens += mine.len();
    }
    Ok(agreement)
}

/// The most a reply's mean log-probability may differ between the frozen
/// model and llama.cpp before train-projector refuses the GGUF: llama.cpp's
/// 8-bit activations and KV cache put them hundredths apart (0.074 on the
/// replies of tests/train_projector.rs, which prints it); a wrong layer or
/// rotation puts them nats apart.
pub const MAX_REPLY_DISAGREEMENT: f64 = 0.25;

/// See [`agreement`] (nats).
#[derive(Debug, Clone, Copy, Default)]
pub struct Agreement {
    pub max_token: f64,
    pub max_reply: f64,
    pub tokens: usize,
}

/// One pass over `examples` in batches of about `batch`, in random order,
/// each batch drawn from examples of similar length: a batch runs padded to
/// its longest sequence, and random batches of chat turns are mostly
/// padding. Examples are shuffled, cut into runs of 16 batches, sorted by
/// length within each run, and cut again into batches.
pub fn batches(examples: &[Example], batch: usize, rng: &mut impl rand::Rng) -> Vec<Vec<usize>> {
    let batch = batch.clamp(1, examples.len().max(1));
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(rng);
    let mut out: Vec<Vec<usize>> = Vec::new();
    for run in order.chunks_mut(16 * batch) {
        run.sort_by_key(|&i| examples[i].after_rows.len() + examples[i].reply.len());
        out.extend(run.chunks(batch).map(<[usize]>::to_vec));
    }
    out.shuffle(rng);
    out
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct ProjectorTrainConfig {
    /// The most steps; a run with validation examples may stop earlier.
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Print the mean loss of the last steps every this many steps.
    pub log_every: usize,
    /// Score the validation examples (and write the checkpoint) every this
    /// many steps, and at step 0.
    pub eval_every: usize,
    /// Stop after this many validation scores in a row without a new best:
    /// the plateau.
    pub patience: usize,
    /// The run's state (parameters, optimiser moments, step, validation
    /// history), written at every validation score; a run given an
    /// existing one continues from it.
    pub checkpoint: Option<PathBuf>,
    /// Names the run (data, vectors, hyper-parameters): a checkpoint of
    /// another run is refused rather than continued. The step budget is
    /// not part of it: a run can be resumed with a larger one.
    pub run: String,
    /// Names the files the run reads (world model, decoder, length limit):
    /// kept apart from `run` so that checkpoints written before it existed
    /// still resume.
    pub inputs: String,
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `patience` validation scores in a row without a new best.
    Plateau,
    /// The step budget ran out.
    Steps,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct ProjectorTrainReport {
    /// Each step's batch loss (mean NLL per reply token), from step 1 (a
    /// resumed run's earlier steps included).
    pub losses: Vec<f32>,
    /// (step, validation NLL per reply token) at each score.
    pub validation: Vec<(usize, f64)>,
    /// The best validation score's step and NLL: the parameters `on_best`
    /// last received.
    pub best: Option<(usize, f64)>,
    pub stopped: Stopped,
    /// The step the run resumed from (0 for a fresh run).
    pub resumed_at: usize,
    /// Seconds this process trained (not a resumed run's earlier ones).
    pub seconds: f64,
}

/// The mean NLL per reply token (token-weighted) of `examples` under
/// `projector`'s rows, in batches of like length, no gradient kept.
pub fn validation_nll(
    scorer: &ReplyScorer<'_>,
    projector: &TrainableProjector,
    examples: &[Example],
    batch: usize,
) -> candle_core::Result<f64> {
    let mut order: Vec<&Example> = examples.iter().collect();
    order.sort_by_key(|e| e.after_rows.len() + e.reply.len());
    let (mut nll, mut tokens) = (0.0f64, 0usize);
    for chunk in order.chunks(batch.max(1)) {
        let vectors: Vec<&[f32]> = chunk.iter().map(|e| e.vector.as_slice()).collect();
        let rows = projector.rows(&vectors)?.detach();
        let log_probs: Vec<f32> = scorer
            .reply_log_probs(&rows, chunk)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        nll -= log_probs.iter().map(|&l| f64::from(l)).sum::<f64>();
        tokens += log_probs.len();
    }
    Ok(nll / tokens.max(1) as f64)
}

/// The checkpoint's format tag.
const CHECKPOINT_FORMAT: &str = "tofy-projector-run-1";

/// Everything but the tensors that a resumed run needs.
struct RunState {
    step: usize,
    losses: Vec<f32>,
    validation: Vec<(usize, f64)>,
    best: Option<(usize, f64)>,
    stale: usize,
}

fn save_checkpoint(
    path: &Path,
    config: &ProjectorTrainConfig,
    projector: &TrainableProjector,
    adam: &Adam,
    state: &RunState,
) -> Result<(), TrainError> {
    // Flat: the shapes are the projector's, known to the reader.
    let data = |t: &Tensor| -> candle_core::Result<TensorData> {
        Ok(TensorData::new(
            vec![t.elem_count()],
            &t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        ))
    };
    let (weight, bias) = projector.state();
    let mut tensors = vec![
        ("weight".to_string(), data(&weight)?),
        ("bias".to_string(), data(&bias)?),
        (
            "centre".to_string(),
            TensorData::new(vec![projector.centre.len()], &projector.centre),
        ),
    ];
    for (i, (m, v)) in adam.moments().iter().enumerate() {
        tensors.push((format!("adam.m.{i}"), data(m)?));
        tensors.push((format!("adam.v.{i}"), data(v)?));
    }
    let mut meta = HashMap::from([
        ("tofy.format".to_string(), CHECKPOINT_FORMAT.to_string()),
        ("run".to_string(), config.run.clone()),
        ("inputs".to_string(), config.inputs.clone()),
        ("step".to_string(), state.step.to_string()),
        ("adam_steps".to_string(), adam.steps().to_string()),
        ("stale".to_string(), state.stale.to_string()),
        (
            "losses".to_string(),
            run::join(&state.losses, f32::to_string),
        ),
        (
            "validation".to_string(),
            run::join(&state.validation, |(s, l)| format!("{s}:{l}")),
        ),
    ]);
    if let Some((step, loss)) = state.best {
        meta.insert("best".to_string(), format!("{step}:{loss}"));
    }
    checkpoint::save(path, &tensors, Some(meta))?;
    Ok(())
}

/// Whether `path`, when it exists, is a checkpoint this run can continue
/// (the check [`train`] makes before resuming, for a caller that wants it
/// before any work).
pub fn check_checkpoint(path: &Path, config: &ProjectorTrainConfig) -> Result<(), TrainError> {
    if !path.exists() {
        return Ok(());
    }
    read_meta(path, &Checkpoint::open(path)?, config).map(drop)
}

/// The checkpoint's metadata, checked to be of this run and of its inputs.
fn read_meta<'a>(
    path: &'a Path,
    file: &Checkpoint,
    config: &ProjectorTrainConfig,
) -> Result<RunMeta<'a>, TrainError> {
    let meta = RunMeta::read(
        path,
        file,
        CHECKPOINT_FORMAT,
        "train-projector",
        &config.run,
    )?;
    // Checkpoints written before `inputs` was kept cannot be checked.
    if let Some(inputs) = meta.optional("inputs")
        && inputs != config.inputs
    {
        return Err(meta.bad(format!(
            "it was trained on other inputs ({inputs}), not this run's ({})",
            config.inputs
        )));
    }
    Ok(meta)
}

/// Reads a checkpoint back into `projector` and `adam`; refuses one of
/// another run.
fn load_checkpoint(
    path: &Path,
    config: &ProjectorTrainConfig,
    projector: &TrainableProjector,
    adam: &mut Adam,
) -> Result<RunState, TrainError> {
    let file = Checkpoint::open(path)?;
    let meta = read_meta(path, &file, config)?;
    let losses = meta.list("losses", |l| l.parse::<f32>().ok())?;
    let validation = meta.list("validation", run::parse_scored)?;
    let best = meta.optional("best").map(|b| meta.scored(b)).transpose()?;
    let tensor = |name: &str, like: &Tensor| -> Result<Tensor, TrainError> {
        let values = file.vector(name, like.elem_count())?;
        Ok(Tensor::from_vec(
            values.to_vec(),
            like.dims(),
            &Device::Cpu,
        )?)
    };
    let (weight, bias) = projector.state();
    let centre = file.vector("centre", projector.centre.len())?;
    if centre.iter().zip(&projector.centre).any(|(a, b)| a != b) {
        return Err(meta.bad("its centre differs from this run's (other vectors)".into()));
    }
    projector.restore(&tensor("weight", &weight)?, &tensor("bias", &bias)?)?;
    let moments = projector
        .vars()
        .iter()
        .enumerate()
        .map(|(i, var)| {
            Ok((
                tensor(&format!("adam.m.{i}"), var.as_tensor())?,
                tensor(&format!("adam.v.{i}"), var.as_tensor())?,
            ))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    adam.restore(meta.number("adam_steps")?, moments)?;
    let step = meta.number("step")?;
    if losses.len() != step {
        return Err(meta.bad(format!("{} losses for {step} steps", losses.len())));
    }
    Ok(RunState {
        step,
        losses,
        validation,
        best,
        stale: meta.number("stale")?,
    })
}

/// Trains `projector` on `examples` with AdamW, one pass after another
/// over the examples in [`batches`]. With `valid` examples, it scores them
/// every `eval_every` steps and at step 0, hands each new best (as a
/// projector, the centre folded in) to `on_best`, and stops at the
/// plateau; without, `on_best` gets the last step's.
pub fn train(
    scorer: &ReplyScorer<'_>,
    projector: &TrainableProjector,
    examples: &[Example],
    valid: &[Example],
    config: &ProjectorTrainConfig,
    on_best: &mut dyn FnMut(&Projector, usize) -> Result<(), crate::projector::ProjectorError>,
) -> Result<ProjectorTrainReport, TrainError> {
    if examples.is_empty() {
        return Err(TrainError::Invalid("no training examples".into()));
    }
    let started = Instant::now();
    let mut adam = Adam::with_rates(projector.rated_vars(), AdamParams::new(config.lr))?;
    let mut state = match &config.checkpoint {
        Some(path) if path.exists() => {
            let state = load_checkpoint(path, config, projector, &mut adam)?;
            eprintln!(
                "train-projector: resuming {} at step {} (best {})",
                path.display(),
                state.step,
                state.best.map_or("none yet".to_string(), |(s, l)| format!(
                    "{l:.4} at step {s}"
                ))
            );
            state
        }
        _ => RunState {
            step: 0,
            losses: Vec::new(),
            validation: Vec::new(),
            best: None,
            stale: 0,
        },
    };
    let resumed_at = state.step;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut pending: Vec<Vec<usize>> = Vec::new();
    // The batch order is the seed's: a resumed run draws the batches it
    // already took and goes on with the next.
    for _ in 0..state.step {
        if pending.is_empty() {
            pending = batches(examples, config.batch, &mut rng);
        }
        pending.pop();
    }
    let every = config.eval_every.max(1);
    // Scores the validation examples at the current step (a new best goes
    // to `on_best`) when `validate`, and writes the checkpoint; true at the
    // plateau. Only steps on the `eval_every` grid are scored, so that a
    // run stopped by a small --steps and resumed with a larger one scores
    // the steps an uninterrupted run scores.
    let mut score = |state: &mut RunState,
                     adam: &Adam,
                     validate: bool|
     -> Result<bool, TrainError> {
        if validate && !valid.is_empty() && state.validation.last().map(|v| v.0) != Some(state.step)
        {
            let loss = validation_nll(scorer, projector, valid, config.batch)?;
            state.validation.push((state.step, loss));
            let better = state.best.is_none_or(|(_, best)| loss < best);
            eprintln!(
                "train-projector: step {}: validation {loss:.4} on {} pairs{}",
                state.step,
                valid.len(),
                if better { " (best)" } else { "" }
            );
            if better {
                state.best = Some((state.step, loss));
                state.stale = 0;
                on_best(&projector.projector("trained".into())?, state.step)?;
            } else {
                state.stale += 1;
            }
        }
        if let Some(path) = &config.checkpoint {
            save_checkpoint(path, config, projector, adam, state)?;
        }
        Ok(!valid.is_empty() && state.stale >= config.patience.max(1))
    };
    let mut stopped = Stopped::Steps;
    let on_grid = state.step % every == 0;
    if score(&mut state, &adam, on_grid)? {
        stopped = Stopped::Plateau;
    }
    while stopped == Stopped::Steps && state.step < config.steps {
        if pending.is_empty() {
            pending = batches(examples, config.batch, &mut rng);
        }
        let picked: Vec<&Example> = pending
            .pop()
            .expect("at least one batch per pass")
            .into_iter()
            .map(|i| &examples[i])
            .collect();
        let vectors: Vec<&[f32]> = picked.iter().map(|e| e.vector.as_slice()).collect();
        let rows = projector.rows(&vectors)?;
        let loss = scorer.loss(&rows, &picked)?;
        adam.backward_step(&loss)?;
        state
            .losses
            .push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        state.step += 1;
        let step = state.step;
        if config.log_every > 0 && step % config.log_every == 0 {
            let recent = &state.losses[state.losses.len().saturating_sub(config.log_every)..];
            eprintln!(
                "train-projector: step {step}/{}: loss {:.4} (mean of the last {}), {:.1} s/step",
                config.steps,
                recent.iter().sum::<f32>() / recent.len() as f32,
                recent.len(),
                started.elapsed().as_secs_f64() / (step - resumed_at) as f64
            );
        }
        let on_grid = step % every == 0;
        if (on_grid || step == config.steps) && score(&mut state, &adam, on_grid)? {
            stopped = Stopped::Plateau;
        }
    }
    if valid.is_empty() {
        on_best(&projector.projector("trained".into())?, state.step)?;
    }
    Ok(ProjectorTrainReport {
        losses: state.losses,
        validation: state.validation,
        best: state.best,
        stopped,
        resumed_at,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_balanced_weight_rate_is_the_inverse_mean_l1_of_the_centred_input() {
        let (a, b) = ([1.0f32, -1.0], [3.0f32, 2.0]);
        // |1-2| + |-1-0| = 2 and |3-2| + |2-0| = 3: mean 2.5.
        assert_eq!(balanced_weight_rate(&[&a, &b], &[2.0, 0.0]), 0.4);
        assert_eq!(
            balanced_weight_rate(&[&a], &a),
            1.0,
            "no spread: the bias's rate"
        );
    }

    #[test]
    fn a_pass_takes_every_example_once_in_batches_of_like_length() {
        let examples: Vec<Example> = (0..100)
            .map(|i| Example {
                pair: Pair {
                    context: String::new(),
                    next: String::new(),
                },
                vector: Vec::new(),
                after_rows: vec![0; 1 + (i * 37) % 90],
                reply: vec![0; 3],
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let pass = batches(&examples, 8, &mut rng);
        let mut seen: Vec<usize> = pass.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(pass.iter().all(|b| !b.is_empty() && b.len() <= 8));
        // Within a batch, lengths are close: sorted runs of 128 of 100
        // examples give batches spanning a few positions, not 90.
        let spread = |b: &Vec<usize>| {
            let lens: Vec<usize> = b.iter().map(|&i| examples[i].after_rows.len()).collect();
            lens.iter().max().unwrap() - lens.iter().min().unwrap()
        };
        assert!(
            pass.iter().all(|b| spread(b) <= 12),
            "{:?}",
            pass.iter().map(spread).collect::<Vec<_>>()
        );
    }
}
