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

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::llama::{FrozenLlama, SharedPrefix, mean_nll};
use crate::conditioning::CondMode;
use crate::data::pairs::Pair;
use crate::decoder::{Embeddings, Segment};
use crate::engine::{Engine, Steer};
use crate::projector::Projector;

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
        format: engine.settings().format,
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

/// The projector's parameters as candle variables, and its forward map.
pub struct TrainableProjector {
    weight: Var,
    bias: Var,
    template: Projector,
    /// The weight stays 0 and only the bias trains: a soft prompt, the same
    /// rows for every vector (the constant baseline the world model must beat).
    bias_only: bool,
}

impl TrainableProjector {
    /// Starts from `init`'s weights (and keeps its K, width and row norm).
    pub fn new(init: &Projector) -> candle_core::Result<Self> {
        let (weight, bias) = init.parameters();
        let rows = init.k() * init.n_embd();
        Ok(Self {
            weight: Var::from_vec(weight.to_vec(), (rows, init.bridge_dim()), &Device::Cpu)?,
            bias: Var::from_vec(bias.to_vec(), rows, &Device::Cpu)?,
            template: init.clone(),
            bias_only: false,
        })
    }

    /// A soft prompt: the weight fixed at 0, the bias starting at `init`'s
    /// rows of `mean` (before their rescaling), so that step 0 gives the rows
    /// of the mean vector (`mean_prefix`), and only the bias trains.
    pub fn bias_only(init: &Projector, mean: &[f32]) -> candle_core::Result<Self> {
        let (weight, bias) = init.parameters();
        let rows = init.k() * init.n_embd();
        let start: Vec<f32> = (0..rows)
            .map(|r| {
                let w = &weight[r * init.bridge_dim()..(r + 1) * init.bridge_dim()];
                bias[r] + w.iter().zip(mean).map(|(a, z)| a * z).sum::<f32>()
            })
            .collect();
        Ok(Self {
            weight: Var::from_vec(
                vec![0.0f32; rows * init.bridge_dim()],
                (rows, init.bridge_dim()),
                &Device::Cpu,
            )?,
            bias: Var::from_vec(start, rows, &Device::Cpu)?,
            template: init.clone(),
            bias_only: true,
        })
    }

    /// The rows `[batch, K, n_embd]` of `vectors`, as [`Projector::project`]
    /// computes them.
    pub fn rows(&self, vectors: &[&[f32]]) -> candle_core::Result<Tensor> {
        let p = &self.template;
        let flat: Vec<f32> = vectors.iter().flat_map(|v| v.iter().copied()).collect();
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
        if self.bias_only {
            vec![self.bias.clone()]
        } else {
            vec![self.weight.clone(), self.bias.clone()]
        }
    }

    /// The current parameters as a projector (`source` names it).
    pub fn projector(&self, source: String) -> candle_core::Result<Projector> {
        let p = &self.template;
        Ok(Projector::from_parts(
            self.weight.as_tensor().flatten_all()?.to_vec1()?,
            self.bias.as_tensor().to_vec1()?,
            p.k(),
            p.n_embd(),
            p.bridge_dim(),
            p.row_norm(),
            p.gguf_name(),
            source,
        ))
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
            format: engine.settings().format,
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
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Print the mean loss of the last steps every this many steps.
    pub log_every: usize,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct ProjectorTrainReport {
    /// Each step's batch loss (mean NLL per reply token).
    pub losses: Vec<f32>,
    pub seconds: f64,
}

/// Trains `projector` on `examples` with AdamW, one pass after another
/// over the examples in [`batches`].
pub fn train(
    scorer: &ReplyScorer<'_>,
    projector: &TrainableProjector,
    examples: &[Example],
    config: &ProjectorTrainConfig,
) -> candle_core::Result<ProjectorTrainReport> {
    let started = Instant::now();
    let mut optimizer = AdamW::new(
        projector.vars(),
        ParamsAdamW {
            lr: config.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut pending: Vec<Vec<usize>> = Vec::new();
    let mut losses = Vec::with_capacity(config.steps);
    for step in 1..=config.steps {
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
        optimizer.backward_step(&loss)?;
        losses.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        if config.log_every > 0 && step % config.log_every == 0 {
            let recent = &losses[losses.len().saturating_sub(config.log_every)..];
            eprintln!(
                "train-projector: step {step}/{}: loss {:.4} (mean of the last {}), {:.1} s/step",
                config.steps,
                recent.iter().sum::<f32>() / recent.len() as f32,
                recent.len(),
                started.elapsed().as_secs_f64() / step as f64
            );
        }
    }
    Ok(ProjectorTrainReport {
        losses,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
