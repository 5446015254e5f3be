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
    /// The most optimiser steps (with --valid the run stops earlier at the plateau).
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
    /// The vectors the projector reads: the world model's prediction from the context, or the
    /// oracle, `bridge(encoder(true reply))`, what a perfect prediction would be (a projector
    /// for measuring the channel's capacity, eval-conditioning's `--oracle-projector`).
    #[arg(long, value_enum, default_value_t = Vectors::Predicted)]
    vectors: Vectors,
    /// The recipe before issue 24 (`scripts/train-projector.sh` reproduces the shipped projector
    /// so): the weight starts at the starting projector's and reads raw vectors [default: the
    /// weight starts at 0 and reads vectors centred on their mean, so that every vector starts
    /// with the same rows, the constant lives in the bias and the weight learns what varies].
    #[arg(long, conflicts_with = "bias_only")]
    keep_weight: bool,
    /// The weight's learning rate as a multiple of the balanced one: --lr divided by the mean L1
    /// norm of the centred input vectors, at which the weight moves a row no faster than the
    /// constant does (Adam moves each weight by about its rate per step, and a row by the sum of
    /// those moves times the input: at --lr the weight would move the rows ~100 times faster).
    /// With --keep-weight the weight trains at --lr, as before issue 24.
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    weight_lr_scale: f64,
    /// Start the constant at this soft prompt's rows (a projector made with --bias-only) instead
    /// of the starting projector's rows of the mean vector.
    #[arg(long, value_name = "FILE", conflicts_with = "keep_weight")]
    constant: Option<PathBuf>,
    /// Validation pairs (e.g. data/chitchat_pairs.valid.tsv): scored every --eval-every steps and
    /// at step 0; --out is the best of them, and the run stops at the plateau.
    #[arg(long, value_name = "FILE")]
    valid: Option<PathBuf>,
    /// Validation pairs scored, drawn with --seed.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    valid_n: u32,
    /// Steps between validation scores (and checkpoints).
    #[arg(long, default_value_t = 25, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    eval_every: u64,
    /// Validation scores in a row without a new best before the run stops.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    patience: u64,
    /// What the world model reads in place of the contexts of PAIRS (and of --valid): pairs files
    /// that hold the same pairs line for line with other contexts, `prepare-chitchat`'s
    /// `.history.tsv` twins (this names the training one; the validation one is --valid's twin,
    /// `X.history.tsv` for `X.tsv`). The decoder's user turn stays the pair's context.
    #[arg(long, value_name = "FILE")]
    world_contexts: Option<PathBuf>,
    /// Log the mean loss every this many steps (0: never).
    #[arg(long, default_value_t = 10, value_name = "N")]
    log_every: usize,
    /// The projector starts from --projector (TOFY_PROJECTOR) or the embedded one.
    #[command(flatten)]
    decoder: DecoderArgs,
}

/// What the projector is trained to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Vectors {
    /// The world model's conditioning vector of the context.
    Predicted,
    /// `bridge(encoder(reply))`: the true reply's own latent.
    Oracle,
}

impl Vectors {
    fn name(self) -> &'static str {
        match self {
            Self::Predicted => "predicted",
            Self::Oracle => "oracle",
        }
    }
}

/// Where a run keeps its state: beside its output (`OUT.run.safetensors`).
pub fn checkpoint_path(out: &std::path::Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".run.safetensors");
    PathBuf::from(name)
}

#[cfg(feature = "train")]
pub fn run(args: TrainProjectorArgs) -> anyhow::Result<()> {
    use super::decoder_args::gguf_and_end_of_turn;
    use crate::data::pairs;
    use crate::decoder::{self, DecoderConfig};
    use crate::engine::Engine;
    use crate::eval_conditioning::{reply_vectors, sample_indices, world_vectors};
    use crate::train::llama::FrozenLlama;
    use crate::train::projector::{self as tp, ProjectorTrainConfig, ReplyScorer};

    anyhow::ensure!(
        args.lr.is_finite() && args.lr > 0.0,
        "--lr must be a positive number (got {})",
        args.lr
    );
    anyhow::ensure!(
        args.weight_lr_scale.is_finite() && args.weight_lr_scale > 0.0,
        "--weight-lr-scale must be a positive number (got {})",
        args.weight_lr_scale
    );
    // Each sampled pair with what the world model reads for it.
    let read = |path: &std::path::Path,
                twin: Option<PathBuf>,
                n: u32|
     -> anyhow::Result<(Vec<pairs::Pair>, Vec<String>)> {
        let all = pairs::read(path)?;
        let contexts = match twin {
            Some(twin) => pairs::world_contexts(&twin, &all)?,
            None => all.iter().map(|p| p.context.clone()).collect(),
        };
        Ok(sample_indices(all.len(), n as usize, args.seed)
            .into_iter()
            .map(|i| (all[i].clone(), contexts[i].clone()))
            .unzip())
    };
    let (picked, contexts) = read(&args.pairs, args.world_contexts.clone(), args.n)?;
    let (valid_pairs, valid_contexts) = match &args.valid {
        Some(path) => {
            let twin = args
                .world_contexts
                .as_ref()
                .map(|_| crate::data::pairs::history_path(path));
            if let Some(twin) = twin.as_ref().filter(|t| !t.exists()) {
                anyhow::bail!(
                    "--world-contexts needs --valid's history twin too, {}, which is missing (`tofy prepare-chitchat` writes it beside {})",
                    twin.display(),
                    path.display()
                );
            }
            read(path, twin, args.valid_n)?
        }
        None => (Vec::new(), Vec::new()),
    };
    let world = args.world.load()?;
    let world_source = world.model_path().display().to_string();
    let vectors_of =
        |pairs: &[pairs::Pair], contexts: &[String]| -> anyhow::Result<Vec<Vec<f32>>> {
            Ok(match args.vectors {
                Vectors::Predicted => world_vectors(&world, contexts)?,
                Vectors::Oracle => reply_vectors(&world, pairs)?,
            })
        };
    let vectors = vectors_of(&picked, &contexts)?;
    let valid_vectors = vectors_of(&valid_pairs, &valid_contexts)?;
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
    let valid = if valid_pairs.is_empty() {
        Vec::new()
    } else {
        let valid = tp::examples(
            &engine,
            &valid_pairs,
            &valid_vectors,
            init.k(),
            &end_of_turn,
            args.max_tokens as usize,
        )?
        .1;
        anyhow::ensure!(
            !valid.is_empty(),
            "every --valid pair is longer than --max-tokens {}",
            args.max_tokens
        );
        valid
    };
    let constant = match &args.constant {
        Some(path) => Some(soft_prompt_constant(path, &init)?),
        None => None,
    };
    // The recipe before issue 24 read raw vectors; the new one centres them.
    let centre: Vec<f32> = if args.keep_weight {
        vec![0.0; init.bridge_dim()]
    } else {
        let used: Vec<Vec<f32>> = examples.iter().map(|e| e.vector.clone()).collect();
        crate::eval_conditioning::mean_vector(&used)
    };
    let weight_rate = if args.keep_weight {
        1.0
    } else {
        let used: Vec<&[f32]> = examples.iter().map(|e| e.vector.as_slice()).collect();
        tp::balanced_weight_rate(&used, &centre) * args.weight_lr_scale
    };
    let trainable = tp::TrainableProjector::new(
        &init,
        tp::Start {
            centre,
            constant,
            keep_weight: args.keep_weight,
            bias_only: args.bias_only,
            weight_rate,
        },
    )?;
    let checkpoint = checkpoint_path(&args.out);
    let train_config = ProjectorTrainConfig {
        steps: args.steps,
        batch: args.batch as usize,
        lr: args.lr,
        seed: args.seed,
        log_every: args.log_every,
        eval_every: args.eval_every as usize,
        patience: args.patience as usize,
        checkpoint: Some(checkpoint.clone()),
        run: run_key(&args, &init, examples.len(), valid.len(), weight_rate),
        inputs: format!(
            "world model {}, decoder {}, at most {} positions",
            world_source,
            gguf.display(),
            args.max_tokens
        ),
    };
    // A checkpoint of another run is refused before any work.
    tp::check_checkpoint(&checkpoint, &train_config)?;
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
    let out = &args.out;
    let run = &train_config.run;
    let mut save = |p: &crate::projector::Projector, step: usize| {
        p.save(
            out,
            &format!("{run}; trained by gradient through the frozen decoder, kept at step {step}"),
        )
    };
    let report = tp::train(
        &scorer,
        &trainable,
        &examples,
        &valid,
        &train_config,
        &mut save,
    )?;
    // A resumed run that finds no new best writes nothing: its --out is
    // the earlier run's, which must still be there.
    anyhow::ensure!(
        args.out.exists(),
        "{} is gone, and its run ended before this one started, so there is nothing to write it from; delete {} to run again",
        args.out.display(),
        checkpoint.display()
    );
    print_report(&report, &args.out, &checkpoint);
    Ok(())
}

/// What a run is, for its checkpoint: everything that makes two runs the
/// same run but the step budget (a run can be resumed with a larger one).
#[cfg(feature = "train")]
fn run_key(
    args: &TrainProjectorArgs,
    init: &crate::projector::Projector,
    examples: usize,
    valid: usize,
    weight_rate: f64,
) -> String {
    let start = match (&args.constant, args.keep_weight) {
        (Some(path), _) => format!("the constant of {}, the weight at 0", path.display()),
        (None, true) => init.source().to_string(),
        (None, false) => format!(
            "{}'s rows of the mean vector, the weight at 0",
            init.source()
        ),
    };
    let what = if args.bias_only {
        "a soft prompt (weight 0, bias only)".to_string()
    } else {
        format!(
            "a projector of {} vectors{}",
            args.vectors.name(),
            if args.keep_weight {
                ""
            } else {
                " (input centred on their mean)"
            }
        )
    };
    format!(
        "{what}; {examples} pairs of {}{} (seed {}), batch {}, lr {}{}, from {start}; validation: {}",
        args.pairs.display(),
        match &args.world_contexts {
            Some(path) => format!(" (the world model reading {})", path.display()),
            None => String::new(),
        },
        args.seed,
        args.batch,
        args.lr,
        if args.bias_only || args.keep_weight {
            String::new()
        } else {
            format!(
                " (the weight's {:.3e}, {} x balanced)",
                args.lr * weight_rate,
                args.weight_lr_scale
            )
        },
        match &args.valid {
            Some(path) => format!(
                "{valid} pairs of {}, every {} steps, patience {}",
                path.display(),
                args.eval_every,
                args.patience
            ),
            None => "none".to_string(),
        }
    )
}

/// The run's summary on stdout: the training loss, the validation scores
/// and what was written.
#[cfg(feature = "train")]
fn print_report(
    report: &crate::train::projector::ProjectorTrainReport,
    out: &std::path::Path,
    checkpoint: &std::path::Path,
) {
    use crate::train::projector::Stopped;
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len().max(1) as f32;
    let losses = &report.losses;
    let tenth = (losses.len() / 10).max(1);
    let trained = losses.len() - report.resumed_at;
    println!(
        "trained {trained} steps in {:.0} s ({:.1} s/step{}): loss {:.4} over the first {tenth} steps -> {:.4} over the last {tenth}",
        report.seconds,
        report.seconds / trained.max(1) as f64,
        if report.resumed_at > 0 {
            format!(", resumed at step {}", report.resumed_at)
        } else {
            String::new()
        },
        mean(&losses[..tenth.min(losses.len())]),
        mean(&losses[losses.len().saturating_sub(tenth)..]),
    );
    match report.best {
        Some((step, nll)) => println!(
            "validation: {} ({}); best {nll:.4} at step {step}, {}; wrote {} (state in {})",
            report
                .validation
                .iter()
                .map(|(s, l)| format!("{s}:{l:.4}"))
                .collect::<Vec<_>>()
                .join(" "),
            match report.stopped {
                Stopped::Plateau => "stopped at the plateau",
                Stopped::Steps => "the step budget ran out",
            },
            if step == 0 { "the start" } else { "kept" },
            out.display(),
            checkpoint.display()
        ),
        None => println!(
            "wrote {} after {} steps (state in {})",
            out.display(),
            losses.len(),
            checkpoint.display()
        ),
    }
}

/// The constant rows of the soft prompt at `path` (its bias), checked to be
/// a soft prompt of `init`'s shape.
#[cfg(feature = "train")]
fn soft_prompt_constant(
    path: &std::path::Path,
    init: &crate::projector::Projector,
) -> anyhow::Result<Vec<f32>> {
    let soft = crate::projector::Projector::load(path)?;
    let (weight, bias) = soft.parameters();
    anyhow::ensure!(
        weight.iter().all(|&w| w == 0.0),
        "--constant {}: its weight is not 0, so it is not a soft prompt (make one with --bias-only)",
        path.display()
    );
    anyhow::ensure!(
        (soft.k(), soft.n_embd(), soft.row_norm()) == (init.k(), init.n_embd(), init.row_norm()),
        "--constant {}: K {}, width {}, row norm {:?}; the starting projector has K {}, width {}, row norm {:?}",
        path.display(),
        soft.k(),
        soft.n_embd(),
        soft.row_norm(),
        init.k(),
        init.n_embd(),
        init.row_norm()
    );
    Ok(bias.to_vec())
}

#[cfg(not(feature = "train"))]
pub fn run(_: TrainProjectorArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "this tofy was built without training support; rebuild with `cargo build --release --features train`"
    )
}
