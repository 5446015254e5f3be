//! `tofy train-projector`: the projector trained by gradient through the
//! frozen decoder (`src/train/projector.rs`; needs the `train` feature).

use std::path::PathBuf;

use clap::Args;

use super::WorldArgs;
use super::decoder_args::DecoderArgs;

#[derive(Debug, Args)]
pub struct TrainProjectorArgs {
    /// `context<TAB>reply` training pairs (e.g. data/chitchat_pairs.fit.tsv).
    pairs: PathBuf,
    /// Where to write the trained projector (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    world: WorldArgs,
    /// Pairs to train on, drawn with --seed (all of them when there are fewer).
    #[arg(long, default_value_t = 2000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    n: u32,
    /// Optimiser steps.
    #[arg(long, default_value_t = 200, value_name = "N")]
    steps: usize,
    /// Pairs per step.
    #[arg(long, default_value_t = 8, value_name = "B",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    batch: u32,
    /// AdamW learning rate. The fitted projector's weights are of order 1e-3
    /// (its rows are rescaled to a set norm afterwards), so steps of 1e-3
    /// already overturn them.
    #[arg(long, default_value_t = 1e-4, value_name = "LR")]
    lr: f64,
    /// Seed of the pair sample and the batch order.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Leave out pairs whose rows, user turn and reply exceed this many positions.
    #[arg(long, default_value_t = 192, value_name = "T",
          value_parser = clap::value_parser!(u32).range(8..=4096))]
    max_tokens: u32,
    /// Train a soft prompt instead: the weight fixed at 0 and only the bias
    /// trained, starting from the rows of the mean vector: one set of rows
    /// for every prompt, the constant steer the world model must beat
    /// (eval-conditioning's `soft_prompt` mode).
    #[arg(long)]
    bias_only: bool,
    /// Log the mean loss every this many steps (0: never).
    #[arg(long, default_value_t = 10, value_name = "N")]
    log_every: usize,
    /// The projector starts from --projector (TOFY_PROJECTOR) or the embedded one.
    #[command(flatten)]
    decoder: DecoderArgs,
}

#[cfg(feature = "train")]
pub fn run(args: TrainProjectorArgs) -> anyhow::Result<()> {
    use super::decoder_args::gguf_and_end_of_turn;
    use crate::data::pairs;
    use crate::decoder::{self, DecoderConfig};
    use crate::engine::Engine;
    use crate::eval_conditioning::{context_vectors, sample};
    use crate::train::llama::FrozenLlama;
    use crate::train::projector::{self as tp, ProjectorTrainConfig, ReplyScorer};

    anyhow::ensure!(
        args.lr.is_finite() && args.lr > 0.0,
        "--lr must be a positive number (got {})",
        args.lr
    );
    let picked = sample(&pairs::read(&args.pairs)?, args.n as usize, args.seed);
    let world = args.world.load()?;
    let vectors = context_vectors(&world, &picked)?;
    // The decoder lays the prompts out (tokenizer, chat template) and scores
    // two of them to check the differentiable copy against llama.cpp.
    let config = DecoderConfig {
        ctx: 1024,
        ..args.decoder.config()
    };
    let engine = Engine::new(
        world,
        decoder::open(&config)?,
        args.decoder.cond_settings(),
        args.decoder.projector()?,
    )?;
    let init = engine.prefix_projector()?.clone();
    let decoder = engine.decoder();
    let (gguf, end_of_turn) = gguf_and_end_of_turn(decoder, "train-projector")?;
    let (before, examples, skipped) = tp::examples(
        &engine,
        &picked,
        &vectors,
        init.k(),
        &end_of_turn,
        args.max_tokens as usize,
    )?;
    anyhow::ensure!(
        !examples.is_empty(),
        "every pair is longer than --max-tokens {}",
        args.max_tokens
    );
    eprintln!(
        "train-projector: {} pairs of {} ({skipped} longer than {} positions left out), {} shared prompt tokens, K={} from {}",
        examples.len(),
        args.pairs.display(),
        args.max_tokens,
        before.len(),
        init.k(),
        init.source()
    );
    let model = FrozenLlama::load(&gguf)?;
    let scorer = ReplyScorer::new(&model, &before)?;
    let probe: Vec<&tp::Example> = examples.iter().take(2).collect();
    let agreement = tp::agreement(&engine, &scorer, &init, &probe, &end_of_turn)?;
    eprintln!(
        "train-projector: the frozen model vs llama.cpp on {} reply tokens: largest difference {:.4} nats on a token, {:.4} on a reply's mean",
        agreement.tokens, agreement.max_token, agreement.max_reply
    );
    anyhow::ensure!(
        agreement.max_reply < tp::MAX_REPLY_DISAGREEMENT,
        "the differentiable decoder disagrees with llama.cpp by {:.3} nats per token (more than {}): this GGUF is not one it reproduces",
        agreement.max_reply,
        tp::MAX_REPLY_DISAGREEMENT
    );
    let trainable = if args.bias_only {
        tp::TrainableProjector::bias_only(&init, &crate::eval_conditioning::mean_vector(&vectors))?
    } else {
        tp::TrainableProjector::new(&init)?
    };
    let train_config = ProjectorTrainConfig {
        steps: args.steps,
        batch: args.batch as usize,
        lr: args.lr,
        seed: args.seed,
        log_every: args.log_every,
    };
    let report = tp::train(&scorer, &trainable, &examples, &train_config)?;
    let description = format!(
        "{} by gradient through the frozen decoder: {} AdamW steps (lr {}, batch {}) on {} pairs of {} (seed {}), from {}",
        if args.bias_only {
            "a soft prompt (weight 0, bias only; the rows of the mean vector at step 0) trained"
        } else {
            "trained"
        },
        args.steps,
        args.lr,
        args.batch,
        examples.len(),
        args.pairs.display(),
        args.seed,
        init.source()
    );
    trainable
        .projector(args.out.display().to_string())?
        .save(&args.out, &description)?;
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len().max(1) as f32;
    let tenth = (report.losses.len() / 10).max(1);
    println!(
        "trained in {:.0} s ({:.1} s/step): loss {:.4} over the first {tenth} steps -> {:.4} over the last {tenth}; wrote {}",
        report.seconds,
        report.seconds / report.losses.len().max(1) as f64,
        mean(&report.losses[..tenth.min(report.losses.len())]),
        mean(&report.losses[report.losses.len().saturating_sub(tenth)..]),
        args.out.display()
    );
    Ok(())
}

#[cfg(not(feature = "train"))]
pub fn run(_: TrainProjectorArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "this tofy was built without training support; rebuild with `cargo build --release --features train`"
    )
}
