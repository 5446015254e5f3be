//! `tofy eval-conditioning`: the decoder's NLL of held-out replies under
//! each conditioning mode, with paired bootstrap intervals.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::WorldArgs;
use super::decoder_args::DecoderArgs;
use crate::data::pairs;
use crate::decoder::{self, DecoderConfig};
use crate::engine::Engine;
use crate::eval_conditioning::{self as ec, EvalOptions};

#[derive(Debug, Args)]
pub struct EvalConditioningArgs {
    /// `context<TAB>reply` pairs (e.g. data/chitchat_pairs.heldout.tsv).
    pairs: PathBuf,
    #[command(flatten)]
    world: WorldArgs,
    /// Pairs to score, drawn with --seed (all of them when there are fewer).
    #[arg(long, default_value_t = 200, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..))]
    n: u32,
    /// Seed of the pair sample, the mismatched pairing and the bootstrap.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    /// Bootstrap resamples.
    #[arg(long, default_value_t = 1000, value_name = "R",
          value_parser = clap::value_parser!(u32).range(100..))]
    resamples: u32,
    /// Pairs scored at once (the decoder's parallel sequences).
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,
    /// Modes to score, comma-separated [default: all of them; the cvec modes with --control]. Paired
    /// differences are reported where both of their modes were scored.
    #[arg(long, value_delimiter = ',', value_name = "MODE,...")]
    modes: Vec<ec::EvalMode>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    decoder: DecoderArgs,
}

pub fn run(args: EvalConditioningArgs) -> anyhow::Result<()> {
    let all = pairs::read(&args.pairs)?;
    let picked = ec::sample(&all, args.n as usize, args.seed);
    if picked.len() < 2 {
        return Err(ec::EvalError::TooFew(picked.len()).into());
    }
    let world = args.world.load()?;
    let projector = args.decoder.projector()?;
    let config = DecoderConfig {
        parallel: args.parallel as usize,
        ..args.decoder.config()
    };
    let engine = Engine::new(
        world,
        decoder::open(&config)?,
        args.decoder.cond_settings(),
        projector,
    )?;
    let decoder = engine.decoder();
    let end_of_turn = decoder.end_of_turn().with_context(|| {
        format!(
            "the {} backend cannot score replies; eval-conditioning needs the llama backend and a GGUF",
            decoder.backend().name()
        )
    })?;
    // The cvec modes take the control map of --control (TOFY_CONTROL).
    let control = args.decoder.control()?;
    let mut modes = if args.modes.is_empty() {
        ec::EvalMode::ALL
            .into_iter()
            .filter(|m| control.is_some() || !m.needs_control())
            .collect()
    } else {
        args.modes.clone()
    };
    modes.sort_unstable();
    modes.dedup();
    let options = EvalOptions {
        modes,
        seed: args.seed,
        resamples: args.resamples as usize,
        parallel: args.parallel as usize,
        format: args.decoder.cond_format,
        control,
        progress: Some(|done, all| {
            // A line per tenth: the run takes minutes on a CPU.
            if done * 10 / all != (done - 1) * 10 / all {
                eprintln!("eval-conditioning: {done}/{all} pairs scored");
            }
        }),
    };
    eprintln!(
        "eval-conditioning: {} pairs of {} x {} modes",
        picked.len(),
        args.pairs.display(),
        options.modes.len()
    );
    let scores = ec::score_pairs(&engine, &picked, &end_of_turn, &options)?;
    let report = ec::report(
        &scores,
        &options,
        decoder
            .model_path()
            .map_or_else(String::new, |p| p.display().to_string()),
        engine
            .projector()
            .map_or_else(|| "none".to_string(), |p| p.source().to_string()),
    );
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{} pairs, {} reply tokens; decoder {}; projector {}",
        report.n,
        report.modes.values().next().map_or(0, |m| m.tokens),
        report.gguf,
        report.projector
    )?;
    writeln!(out, "\n| mode | NLL per reply token |\n|---|---:|")?;
    for mode in &options.modes {
        writeln!(
            out,
            "| {} | {:.4} |",
            mode.name(),
            report.modes[mode.name()].nll
        )?;
    }
    writeln!(
        out,
        "\n| difference (negative: the first expects the reply more) | mean | 95% interval |\n|---|---:|---|"
    )?;
    for (name, d) in &report.paired {
        writeln!(
            out,
            "| {name} | {:+.4} | [{:+.4}, {:+.4}] |",
            d.mean, d.lo, d.hi
        )?;
    }
    Ok(())
}
