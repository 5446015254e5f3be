//! `tofy fit-projector`: ridge regression from the world vector to K target
//! rows (`src/fit_projector.rs`), written as a projector file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::WorldArgs;
use super::decoder_args::{DecoderArgs, gguf_and_end_of_turn};
use crate::data::pairs;
use crate::decoder::llama::ffi::TokenEmbeddings;
use crate::decoder::{self, DecoderConfig};
use crate::eval_conditioning::{context_vectors, sample};

#[derive(Debug, Args)]
pub struct FitProjectorArgs {
    /// `context<TAB>reply` training pairs (e.g. data/chitchat_pairs.tsv).
    pairs: PathBuf,
    /// Where to write the projector (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    world: WorldArgs,
    /// Embedding rows per conditioning vector.
    #[arg(long, default_value_t = 4, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    k: u32,
    /// Ridge weight lambda on the map (the intercept is not penalised).
    #[arg(
        long,
        default_value_t = 10.0,
        value_name = "L",
        allow_negative_numbers = true
    )]
    ridge: f64,
    /// L2 norm of each output row [default: the median norm of the GGUF's token rows].
    #[arg(long, value_name = "F")]
    row_norm: Option<f32>,
    /// Pairs to fit on, drawn with --seed (all of them when there are fewer).
    #[arg(long, default_value_t = 20_000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..))]
    n: u32,
    /// Seed of the pair sample.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    #[command(flatten)]
    decoder: DecoderArgs,
}

pub fn run(args: FitProjectorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.ridge.is_finite() && args.ridge >= 0.0,
        "--ridge must be a number, 0 or more (got {})",
        args.ridge
    );
    if let Some(norm) = args.row_norm {
        anyhow::ensure!(
            norm.is_finite() && norm > 0.0,
            "--row-norm must be a positive number (got {norm})"
        );
    }
    let picked = sample(&pairs::read(&args.pairs)?, args.n as usize, args.seed);
    let world = args.world.load()?;
    // The decoder is loaded for its tokenizer and chat template only.
    let config = DecoderConfig {
        ctx: 256,
        ..args.decoder.config()
    };
    let decoder = decoder::open(&config)?;
    let (gguf, end_of_turn) = gguf_and_end_of_turn(decoder.as_ref(), "fit-projector")?;
    let table = TokenEmbeddings::open(&gguf)?;
    let k = args.k as usize;
    eprintln!(
        "fit-projector: {} pairs of {}, K={k}, ridge {}",
        picked.len(),
        args.pairs.display(),
        args.ridge
    );
    let vectors = context_vectors(&world, &picked)?;
    let mut targets = Vec::with_capacity(picked.len());
    for pair in &picked {
        let tokens = decoder.tokenize(&format!("{}{end_of_turn}", pair.next), false)?;
        let rows = table.rows(&tokens)?;
        targets.push(crate::fit_projector::slot_targets(&rows, table.width(), k));
    }
    let row_norm = match args.row_norm {
        Some(norm) => norm,
        None => super::projector::median_row_norm(&table)?,
    };
    let name = gguf
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let (projector, summary) = crate::fit_projector::fit(
        &vectors,
        &targets,
        k,
        table.width(),
        args.ridge,
        row_norm,
        &name,
    )
    .context("the regression is singular: use a --ridge above 0 or more pairs")?;
    let description = format!(
        "ridge regression (lambda {}, K {k}, {} pairs of {}, seed {}) from the world vector to centred mean reply-token rows, rows at norm {row_norm}",
        args.ridge,
        summary.pairs,
        args.pairs.display(),
        args.seed
    );
    projector.save(&args.out, &description)?;
    eprintln!(
        "wrote {}: K={k} rows of {} for {name}; R^2 on the fitted pairs {:.4}",
        args.out.display(),
        table.width(),
        summary.r_squared
    );
    Ok(())
}
