//! `tofy prepare-chitchat`, `tofy prepare-chatterbot`, `tofy train-world`
//! and `tofy eval-world`: the data, training and evaluation commands for
//! world models.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{DeviceArgs, WorldSizeArgs};
use crate::data::{chatterbot, chitchat, pairs};
use crate::eval::{self, EvalReport};
use crate::world::{LoadOptions, WorldModel};

/// Where `make data` unpacks the PyPI package `chitchat-dataset`.
const DEFAULT_DATASET: &str = "data/chitchat/chitchat_dataset/dataset.json";

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Output pairs file; the held-out split is written beside it as
    /// `<name>.heldout.tsv`, and the training pairs once more as
    /// `<name>.fit.tsv` + `<name>.valid.tsv` (for choosing hyper-parameters).
    #[arg(default_value = "data/chitchat_pairs.tsv")]
    out: PathBuf,
    /// The corpus: `dataset.json` of the PyPI package chitchat-dataset (`make data` fetches it).
    #[arg(long, default_value = DEFAULT_DATASET)]
    dataset: PathBuf,
}

/// Where `make data-ood` unpacks the PyPI package `chatterbot-corpus`.
const DEFAULT_CHATTERBOT: &str = "data/chatterbot/chatterbot_corpus/data/english";

#[derive(Debug, Args)]
pub struct PrepareChatterbotArgs {
    /// Output pairs file (all of it held out); its `.conversations` sidecar and `.history.tsv`
    /// twin are written beside it.
    #[arg(default_value = "data/chatterbot_pairs.tsv")]
    out: PathBuf,
    /// The corpus: the `data/english` folder of the PyPI package chatterbot-corpus (`make
    /// data-ood` fetches it).
    #[arg(long, default_value = DEFAULT_CHATTERBOT)]
    corpus: PathBuf,
}

pub fn prepare_chatterbot(args: PrepareChatterbotArgs) -> anyhow::Result<()> {
    let done = chatterbot::prepare(&args.corpus, &args.out)?;
    println!(
        "{} files, {} conversations -> {} out-of-domain pairs in {}{}",
        done.files,
        done.conversations,
        done.pairs,
        done.path.display(),
        if done.malformed.is_empty() {
            String::new()
        } else {
            format!(
                " ({} entries that are not a list of text turns left out: {})",
                done.malformed.len(),
                done.malformed.join(", ")
            )
        }
    );
    Ok(())
}

pub fn prepare(args: PrepareArgs) -> anyhow::Result<()> {
    let done = chitchat::prepare(&args.dataset, &args.out)?;
    println!(
        "{} conversations -> {} training pairs in {}, {} held-out pairs (every {}th conversation) in {}",
        done.conversations,
        done.train_pairs,
        done.train_path.display(),
        done.heldout_pairs,
        chitchat::HELD_OUT_EVERY,
        done.heldout_path.display()
    );
    println!(
        "the training pairs split again for hyper-parameter choices: {} in {}, {} (every {}th training conversation) in {}",
        done.fit_pairs,
        done.fit_path.display(),
        done.valid_pairs,
        chitchat::VALID_EVERY,
        done.valid_path.display()
    );
    Ok(())
}

/// The seed's positional order: steps batch dim max_seq num_layers num_heads max_vocab bridge_dim.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Pairs file: one `context<TAB>next_turn` (or `context|||next_turn`) per line.
    pairs: PathBuf,
    /// Optimiser steps.
    #[arg(default_value_t = 2000)]
    steps: usize,
    /// Pairs per step.
    #[arg(default_value_t = 32)]
    batch: usize,
    /// Encoder width.
    #[arg(default_value_t = 368)]
    dim: usize,
    /// Tokens read per text.
    #[arg(default_value_t = 128)]
    max_seq: usize,
    /// Encoder blocks.
    #[arg(default_value_t = 4)]
    num_layers: usize,
    /// Attention heads (must divide dim).
    #[arg(default_value_t = 8)]
    num_heads: usize,
    /// Most frequent tokens kept, besides <pad>, <unk>, <mask>.
    #[arg(default_value_t = 8000)]
    max_vocab: usize,
    /// Length of the conditioning vector.
    #[arg(default_value_t = 256)]
    bridge_dim: usize,
    /// Peak learning rate (AdamW, linear warm-up then cosine decay).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Weight of the VICReg variance term that keeps latents from collapsing (0 disables).
    #[arg(long, default_value_t = 1.0)]
    var_weight: f64,
    /// Weight of the VICReg covariance term that decorrelates latent dimensions.
    #[arg(long, default_value_t = 0.04)]
    cov_weight: f64,
    /// Weight of the InfoNCE term: each prediction must pick its own next turn out of the batch's (0 disables).
    #[arg(long, default_value_t = 3.0)]
    nce_weight: f64,
    /// Learning rate of the token embeddings, as a multiple of --lr (their rows train only when their token is in the batch).
    #[arg(long, default_value_t = 10.0)]
    embed_lr_scale: f64,
    /// Start from the encoder.* tensors of this checkpoint (and the vocab_world.txt beside it).
    #[arg(long, value_name = "PATH")]
    init_encoder: Option<PathBuf>,
    /// Held-out pairs for the logged cosine [default: <pairs>.heldout.tsv if present].
    #[arg(long, value_name = "PATH")]
    heldout: Option<PathBuf>,
    /// Seed of the initial weights and of batch sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for model_world_<size>.safetensors, its _teacher twin and vocab_world.txt.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Log train and held-out transition cosine every N steps.
    #[arg(long, default_value_t = 100)]
    log_every: usize,
    /// Write the run's checkpoint (OUT/train-world.run.safetensors) every N steps (0: never);
    /// the same command run again resumes from it, and Ctrl-C writes it before stopping.
    #[arg(long, default_value_t = 100, value_name = "N")]
    checkpoint_every: usize,
    /// Stop after step N (counted from the run's start) with the checkpoint written, to split a
    /// long run over several sittings; run again without it (or with a larger N) to go on.
    #[arg(long, value_name = "N")]
    stop_after: Option<usize>,
}

/// `train-world`: a signal stops it at the end of the step, checkpoint
/// written, with the shell's code for the signal.
#[cfg(feature = "train")]
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    use anyhow::Context;

    let interrupt =
        super::interrupt::Interrupt::install().context("installing the Ctrl-C handler")?;
    let config = crate::train::TrainConfig {
        pairs: args.pairs,
        steps: args.steps,
        batch: args.batch,
        dim: args.dim,
        max_seq: args.max_seq,
        num_layers: args.num_layers,
        num_heads: args.num_heads,
        max_vocab: args.max_vocab,
        bridge_dim: args.bridge_dim,
        lr: args.lr,
        weight_decay: args.weight_decay,
        var_weight: args.var_weight,
        cov_weight: args.cov_weight,
        nce_weight: args.nce_weight,
        embed_lr_scale: args.embed_lr_scale,
        init_encoder: args.init_encoder,
        heldout: args.heldout,
        seed: args.seed,
        out: args.out,
        log_every: args.log_every,
        checkpoint_every: args.checkpoint_every,
        stop_after: args.stop_after,
        cancel: Some(interrupt.flag()),
        progress: true,
    };
    let report = match crate::train::train(&config) {
        Err(e @ crate::train::TrainError::Interrupted { .. }) => {
            eprintln!("train-world: {e}");
            return Err(interrupt
                .caught()
                .map_or_else(|| anyhow::Error::new(e), anyhow::Error::new));
        }
        other => other?,
    };
    if !report.finished {
        println!(
            "stopped at step {} of {} (--stop-after) in {:.0} s; run the same command without --stop-after (or with a larger one) to go on from {}",
            report.losses.len(),
            config.steps,
            report.seconds,
            crate::train::trainer::checkpoint_path(&config.out).display()
        );
        return Ok(());
    }
    println!(
        "trained {} in {:.0} s: loss {:.4} -> {:.4}; wrote {}, {}, {}",
        report.config.summary(),
        report.seconds,
        report.losses.first().copied().unwrap_or(f32::NAN),
        report.losses.last().copied().unwrap_or(f32::NAN),
        report.model_path.display(),
        report.teacher_path.display(),
        report.vocab_path.display()
    );
    Ok(())
}

#[cfg(not(feature = "train"))]
pub fn train(_: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "this tofy was built without training support; rebuild with `cargo build --release --features train`"
    )
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// World-model checkpoint (model_world_*.safetensors).
    model: PathBuf,
    /// Its vocabulary (vocab_world.txt).
    vocab: PathBuf,
    /// Held-out pairs file (e.g. data/chitchat_pairs.heldout.tsv).
    pairs: PathBuf,
    #[command(flatten)]
    sizes: WorldSizeArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// EMA teacher that encodes the next turns, as in training
    /// [default: <model>_teacher.safetensors beside the model, if present].
    #[arg(long, value_name = "PATH")]
    teacher: Option<PathBuf>,
    /// Encode next turns with the model's own encoder even if a teacher is present.
    #[arg(long, conflicts_with = "teacher")]
    no_teacher: bool,
    /// Also the held-out ridge R² of the prediction against another world model's encoding of the
    /// next turns (its own vocab): one target for every model, so that two models compare fairly.
    #[arg(long, num_args = 2, value_names = ["MODEL", "VOCAB"])]
    reply_encoder: Option<Vec<PathBuf>>,
    /// Evaluate at most this many pairs (the first ones of the file); the default covers all 6,580 of chitchat's held-out split.
    #[arg(long, default_value_t = 10_000)]
    max_pairs: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn evaluate(args: EvalArgs) -> anyhow::Result<()> {
    let options = LoadOptions {
        overrides: args.sizes.into(),
        device: args.device.device,
        ..Default::default()
    };
    let model = WorldModel::load(&args.model, &args.vocab, &options)?;
    if let Some(notice) = super::world_notice(&model) {
        eprintln!("{notice}");
    }
    let beside = teacher_beside(&args.model).filter(|p| p.exists());
    let teacher_path = if args.no_teacher {
        None
    } else {
        args.teacher.or(beside)
    };
    let teacher = match &teacher_path {
        Some(path) => Some(WorldModel::load(
            path,
            &args.vocab,
            &LoadOptions {
                allow_teacher: true,
                ..options
            },
        )?),
        None => None,
    };
    let pairs = pairs::read(&args.pairs)?;
    let report = eval::evaluate(
        &model,
        teacher.as_ref().unwrap_or(&model),
        &pairs,
        args.max_pairs,
    )?;
    let against = match args.reply_encoder.as_deref() {
        Some([encoder, vocab]) => {
            let other = WorldModel::load(encoder, vocab, &LoadOptions::default())?;
            let name = encoder.display().to_string();
            Some(eval::ridge_r2_against(
                &model,
                &other,
                name,
                &pairs,
                args.max_pairs,
            )?)
        }
        _ => None,
    };
    let targets = teacher_path.map_or("the model's own encoder".to_string(), |p| {
        p.display().to_string()
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(a) = &against {
            value["ridge_r2_against"] = serde_json::to_value(a)?;
        }
        serde_json::to_writer(&mut out, &value)?;
        writeln!(out)?;
    } else {
        writeln!(out, "next turns encoded by {targets}")?;
        write!(out, "{}", render(&report))?;
        if let Some(a) = &against {
            writeln!(
                out,
                "held-out R² of a ridge map to {}'s next-turn latent ({} pairs)\n\
                 \x20 from the prediction  {:>7}\n\
                 \x20 from the context     {:>7}",
                a.encoder,
                a.pairs,
                r2_text(a.prediction),
                r2_text(a.context)
            )?;
        }
    }
    Ok(())
}

/// `model_world_X_teacher.safetensors` for `model_world_X.safetensors`.
fn teacher_beside(model: &std::path::Path) -> Option<PathBuf> {
    let stem = model.file_stem()?.to_str()?;
    Some(model.with_file_name(format!("{stem}_teacher.safetensors")))
}

/// A ridge R² to four decimals, or "n/a" where it is undefined.
fn r2_text(r2: Option<f64>) -> String {
    r2.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

/// The report as a small table for people.
pub fn render(r: &EvalReport) -> String {
    format!(
        "held-out pairs: {}\n\
         next-turn latent        cosine    L2        R²\n\
         \x20 transition (model)   {:>7.4}  {:>7.4}  {:>7.4}\n\
         \x20 copy baseline        {:>7.4}  {:>7.4}  {:>7.4}\n\
         \x20 mean baseline        {:>7.4}  {:>7.4}  {:>7.4}\n\
         latents: per-dim std mean {:.4}, min {:.4}; effective rank {:.1} of {}\n\
         retrieval of the true next turn among {}   top-1    top-5\n\
         \x20 model                {:>7.3}  {:>7.3}\n\
         \x20 copy baseline        {:>7.3}  {:>7.3}\n\
         \x20 chance               {:>7.3}  {:>7.3}\n\
         held-out R² of a ridge map to the next-turn latent (two-fold)\n\
         \x20 from the prediction  {:>7}\n\
         \x20 from the context     {:>7}\n",
        r.pairs,
        r.transition.cosine,
        r.transition.l2,
        r.transition.r2,
        r.copy_baseline.cosine,
        r.copy_baseline.l2,
        r.copy_baseline.r2,
        r.mean_baseline.cosine,
        r.mean_baseline.l2,
        r.mean_baseline.r2,
        r.latent_std_mean,
        r.latent_std_min,
        r.effective_rank,
        r.dim,
        r.candidates,
        r.retrieval_model.top1,
        r.retrieval_model.top5,
        r.retrieval_copy.top1,
        r.retrieval_copy.top5,
        r.retrieval_chance.top1,
        r.retrieval_chance.top5,
        r2_text(r.ridge_r2_transition),
        r2_text(r.ridge_r2_copy),
    )
}
