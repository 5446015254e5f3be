//! `tofy bench-world`: the world model's forward pass timed at each batch
//! size on one device (what llama-bench is to a GGUF), and, with `--dump`,
//! every prompt's ids and outputs written out for parity checks against
//! another device or another implementation (scripts/gpu-check.sh,
//! scripts/world_ref.py).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{DeviceArgs, WorldSizeArgs, WorldSpec};
use crate::world::{Encoded, LoadOptions, MAX_FORWARD_BATCH};

#[derive(Debug, Args)]
pub struct BenchWorldArgs {
    /// `[MODEL VOCAB]`: a world model to time instead of the embedded default.
    #[arg(value_name = "MODEL VOCAB", num_args = 0..=2)]
    world: Vec<String>,
    #[command(flatten)]
    sizes: WorldSizeArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// CPU threads for the world model [default: all cores].
    #[arg(long, env = "TOFY_THREADS", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Batch sizes (prompts per forward pass), comma-separated; at most 32.
    #[arg(long, value_delimiter = ',', default_value = "1,32",
          value_parser = clap::value_parser!(u32).range(1..=MAX_FORWARD_BATCH as i64))]
    batch: Vec<u32>,
    /// Timed forward passes per batch size, after as many untimed ones (at most 10).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Prompts, one per line [default: 32 built-in prompts of mixed lengths].
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Also write every prompt's token ids and outputs, computed in forward passes of each
    /// --batch size, to this JSON file.
    #[arg(long, value_name = "FILE")]
    dump: Option<PathBuf>,
}

/// One line of output per batch size.
#[derive(Serialize)]
struct Timing<'a> {
    device: &'a str,
    model: String,
    batch: usize,
    iters: u32,
    median_ms: f64,
    p10_ms: f64,
    p90_ms: f64,
    mean_ms: f64,
}

#[derive(Serialize)]
struct Dump<'a> {
    device: &'a str,
    model: String,
    dim: usize,
    max_seq: usize,
    bridge_dim: usize,
    runs: Vec<DumpRun>,
}

#[derive(Serialize)]
struct DumpRun {
    batch: usize,
    prompts: Vec<DumpPrompt>,
}

#[derive(Serialize)]
struct DumpPrompt {
    ids: Vec<u32>,
    state: Vec<f32>,
    next: Vec<f32>,
    conditioning: Vec<f32>,
}

/// The most warm-up passes before timing: the first launches compile,
/// capture graphs and fault pages in.
const WARMUP: u32 = 10;

pub fn run(args: BenchWorldArgs) -> anyhow::Result<()> {
    let spec = match args.world.as_slice() {
        [model, vocab] => WorldSpec::Files { model, vocab },
        [] => WorldSpec::Default,
        _ => anyhow::bail!("bench-world takes a world model and its vocab, or nothing"),
    };
    let options = LoadOptions {
        overrides: args.sizes.into(),
        threads: args.threads.map(|t| t as usize),
        device: args.device.device,
        ..Default::default()
    };
    let world = spec.load(&options)?;
    if let Some(notice) = super::world_notice(&world) {
        eprintln!("{notice}");
    }
    let prompts = match &args.prompts {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the prompts file {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => builtin_prompts(),
    };
    anyhow::ensure!(
        !prompts.is_empty(),
        "the prompts file holds no prompt; give one per line"
    );
    let encoded = world.encode(&prompts)?;
    let device = world.device_description();
    let model = world.model_path().display().to_string();

    let mut out = std::io::stdout().lock();
    for &b in &args.batch {
        let batch = cycled(&encoded, b as usize);
        for _ in 0..args.iters.min(WARMUP) {
            world.forward(&batch)?;
        }
        let mut ms = Vec::with_capacity(args.iters as usize);
        for _ in 0..args.iters {
            let start = Instant::now();
            world.forward(&batch)?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        let line = Timing {
            device: &device,
            model: model.clone(),
            batch: b as usize,
            iters: args.iters,
            median_ms: at(0.5),
            p10_ms: at(0.1),
            p90_ms: at(0.9),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    }

    if let Some(path) = &args.dump {
        let mut runs = Vec::new();
        for &b in &args.batch {
            let mut dumped = Vec::with_capacity(encoded.len());
            for chunk in encoded.chunks(b as usize) {
                let outputs = world.forward(chunk)?;
                // JSON has no NaN: a non-finite value would be written as null.
                anyhow::ensure!(
                    [&outputs.state, &outputs.next, &outputs.conditioning]
                        .iter()
                        .all(|a| a.iter().all(|v| v.is_finite())),
                    "the forward pass on {device} gave a non-finite value at batch size {b}"
                );
                for (i, e) in chunk.iter().enumerate() {
                    dumped.push(DumpPrompt {
                        ids: e.ids.clone(),
                        state: outputs.state.row(i).to_vec(),
                        next: outputs.next.row(i).to_vec(),
                        conditioning: outputs.conditioning.row(i).to_vec(),
                    });
                }
            }
            runs.push(DumpRun {
                batch: b as usize,
                prompts: dumped,
            });
        }
        let cfg = world.config();
        let dump = Dump {
            device: &device,
            model,
            dim: cfg.dim,
            max_seq: cfg.max_seq,
            bridge_dim: cfg.bridge_dim,
            runs,
        };
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &dump)?;
    }
    Ok(())
}

/// `n` prompts, the given ones repeated as needed.
fn cycled(encoded: &[Encoded], n: usize) -> Vec<Encoded> {
    encoded.iter().cycle().take(n).cloned().collect()
}

/// 32 prompts from one word to past max_seq tokens.
fn builtin_prompts() -> Vec<String> {
    const BASE: [&str; 8] = [
        "hi",
        "write a short gpu recommendation",
        "what is the best card for training small models on a budget?",
        "i can't decide between more memory and more speed, what would you do",
        "hello world, it's 5pm and we still have not shipped the release",
        "tell me about your weekend",
        "the café on the corner serves the best coffee in town, don't you think?",
        "can you explain why attention over padded positions still works",
    ];
    (0..32)
        .map(|i| {
            let base = BASE[i % BASE.len()];
            // Every fourth prompt is long enough to be cut at max_seq 128.
            let repeats = if i % 4 == 3 { 12 } else { 1 + i / 8 };
            vec![base; repeats].join(" ")
        })
        .collect()
}
