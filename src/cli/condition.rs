//! `tofy condition`: the world model's conditioning vectors, as JSON lines
//! for programs or a short summary for people.

use std::io::{BufWriter, Write};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::{DeviceArgs, WorldSizeArgs};
use crate::conditioning::Summary;
use crate::world::{Conditioned, LoadOptions};

#[derive(Debug, Args)]
pub struct ConditionArgs {
    /// `[MODEL VOCAB] PROMPT...`: a world-model checkpoint
    /// (model_world_*.safetensors) and its vocab_world.txt, then the prompts;
    /// without them, the prompts go to the embedded default world model.
    #[arg(required = true, value_name = "[MODEL VOCAB] PROMPT")]
    inputs: Vec<String>,
    #[command(flatten)]
    sizes: WorldSizeArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Replace each conditioning vector with zeros of the same length.
    #[arg(long)]
    ablate_conditioning: bool,
    /// Print one JSON object per prompt per line:
    /// {"prompt", "tokens", "conditioning"}.
    #[arg(long)]
    json: bool,
    /// CPU threads for the world model [default: all cores].
    #[arg(long, env = "TOFY_THREADS", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
}

/// One line of `--json` output. Floats are written in their shortest form
/// that parses back to the same f32.
#[derive(Serialize)]
struct JsonLine<'a> {
    prompt: &'a str,
    tokens: usize,
    conditioning: &'a [f32],
}

pub fn run(args: ConditionArgs) -> anyhow::Result<()> {
    let options = LoadOptions {
        overrides: args.sizes.into(),
        threads: args.threads.map(|t| t as usize),
        device: args.device.device,
        ..Default::default()
    };
    let (model, prompts) = super::world_and_rest(&args.inputs, &options)?;
    if let Some(notice) = super::world_notice(&model) {
        eprintln!("{notice}");
    }
    let results = if args.ablate_conditioning {
        model.ablated(prompts)?
    } else {
        model.condition_batch(prompts)?
    };

    let mut out = BufWriter::new(std::io::stdout().lock());
    if args.json {
        for (prompt, r) in prompts.iter().zip(&results) {
            let line = JsonLine {
                prompt,
                tokens: r.tokens,
                conditioning: &r.vector,
            };
            serde_json::to_writer(&mut out, &line)?;
            writeln!(out)?;
        }
    } else {
        writeln!(
            out,
            "world model {} ({}; {} backend)",
            model.model_path().display(),
            model.config().summary(),
            model.backend_name()
        )?;
        for (i, (prompt, r)) in prompts.iter().zip(&results).enumerate() {
            writeln!(
                out,
                "{}",
                summary(
                    i + 1,
                    prompt,
                    r,
                    model.config().max_seq,
                    args.ablate_conditioning
                )
            )?;
        }
    }
    out.flush().context("writing to stdout")
}

/// `[1] "prompt": 6 tokens -> 256 values, mean .., std .., l2 .., head [..]`.
fn summary(index: usize, prompt: &str, r: &Conditioned, max_seq: usize, ablated: bool) -> String {
    let Summary { mean, std, l2 } = Summary::of(&r.vector);
    let head: Vec<String> = r.vector.iter().take(4).map(|v| format!("{v:.4}")).collect();
    let truncated = if r.total_tokens > r.tokens {
        format!(" (truncated from {} to max_seq {max_seq})", r.total_tokens)
    } else {
        String::new()
    };
    let note = if ablated { " [ablated]" } else { "" };
    format!(
        "[{index}] {prompt:?}: {} tokens{truncated} -> {} values{note}: mean {mean:.4}, std {:.4}, l2 {l2:.4}, head [{}, ...]",
        r.tokens,
        r.vector.len(),
        std,
        head.join(", ")
    )
}
