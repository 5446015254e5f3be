//! `tofy random-projector`: writes a fixed random projector for a GGUF, a
//! placeholder for a decoder no projector has been fitted for, and the
//! baseline fitted ones are compared with (`models/projector/README.md`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::decoder::discovery;
use crate::decoder::llama::ffi::TokenEmbeddings;
use crate::projector::Projector;
use crate::world::{LoadOptions, WorldModel};

#[derive(Debug, Args)]
pub struct RandomProjectorArgs {
    /// Where to write the projector (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Embedding rows per conditioning vector.
    #[arg(long, default_value_t = 4, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    k: u32,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0, value_name = "N")]
    seed: u64,
    /// Length of the conditioning vector [default: the embedded world model's bridge_dim].
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u32).range(1..))]
    bridge_dim: Option<u32>,
    /// The decoder GGUF [default: first of ./models/*.gguf, as everywhere else].
    #[arg(
        long = "decoder-model",
        env = "JEPA_DECODER_MODEL",
        value_name = "GGUF"
    )]
    model: Option<PathBuf>,
}

pub fn run(args: RandomProjectorArgs) -> anyhow::Result<()> {
    let gguf = discovery::find_model(args.model.as_deref(), std::path::Path::new("."))?
        .context("no decoder GGUF found: pass --decoder-model or put one under ./models")?;
    let table = TokenEmbeddings::open(&gguf)?;
    let bridge_dim = match args.bridge_dim {
        Some(b) => b as usize,
        None => {
            // Only its size is read: no need for a GPU.
            WorldModel::load_default(&LoadOptions {
                device: crate::world::Device::Cpu,
                ..Default::default()
            })?
            .config()
            .bridge_dim
        }
    };
    let norm = median_row_norm(&table)?;
    let name = gguf
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let projector = Projector::random(
        bridge_dim,
        args.k as usize,
        table.width(),
        norm,
        args.seed,
        &name,
    );
    let description = format!(
        "placeholder: fixed random projection (seed {}), rows at the median token-embedding norm {norm} of {name}; nothing learned",
        args.seed
    );
    projector.save(&args.out, &description)?;
    eprintln!(
        "wrote {}: K={} rows of {} for {name}, bridge_dim {bridge_dim}, row norm {norm}",
        args.out.display(),
        args.k,
        table.width()
    );
    Ok(())
}

/// The median L2 norm of the table's rows: where real token embeddings sit.
pub(crate) fn median_row_norm(table: &TokenEmbeddings) -> anyhow::Result<f32> {
    let mut row = vec![0.0; table.width()];
    let mut norms = Vec::with_capacity(table.n_vocab());
    for token in 0..table.n_vocab() {
        table.row_into(token as i32, &mut row)?;
        norms.push(row.iter().map(|v| v * v).sum::<f32>().sqrt());
    }
    norms.sort_by(f32::total_cmp);
    Ok(norms[norms.len() / 2])
}
