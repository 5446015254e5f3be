//! `tofy eval-conditioning`: the decoder's NLL of held-out replies under
//! each conditioning mode, with paired bootstrap intervals over the pairs'
//! conversations (from the pairs file's `.conversations` sidecar, or
//! inferred from its order), and optionally every pair's score per mode.

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
use crate::projector::Projector;

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
    /// Leave out the first N pairs of the seed's draw: those that earlier reads of the same
    /// file took (the ledger in docs/conditioning.md), so that a new read scores fresh pairs.
    #[arg(long, default_value_t = 0, value_name = "N")]
    skip: u32,
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
    /// The soft prompt of the `soft_prompt` mode (made by `tofy train-projector --bias-only`).
    #[arg(long, value_name = "FILE")]
    soft_prompt: Option<PathBuf>,
    /// The projector of the `oracle` modes (made by `tofy train-projector --vectors oracle`).
    #[arg(long, value_name = "FILE")]
    oracle_projector: Option<PathBuf>,
    /// What the world model reads in place of each pair's context: a pairs file that holds the
    /// same pairs line for line with other contexts (`prepare-chitchat`'s `.history.tsv`, the
    /// conversation so far). The decoder's user turn stays the pair's context.
    #[arg(long, value_name = "FILE")]
    world_contexts: Option<PathBuf>,
    /// Also write every pair's reply NLL (summed) and tokens under each mode, as TSV
    /// (`pair conversation mode nll tokens`, `pair` the line's index in the pairs file), so
    /// that two runs on the same sample can be paired offline.
    #[arg(long, value_name = "FILE")]
    per_pair: Option<PathBuf>,
    /// Modes to score, comma-separated [default: all of them; the cvec modes with --control,
    /// soft_prompt with --soft-prompt, the oracle modes with
    /// --oracle-projector]. Paired
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
    // Checked before anything is read or printed: a bad invocation is one line.
    if args.soft_prompt.is_none() && args.modes.iter().any(|m| m.needs_soft_prompt()) {
        return Err(ec::EvalError::NoSoftPrompt.into());
    }
    if args.oracle_projector.is_none() && args.modes.iter().any(|m| m.needs_oracle_projector()) {
        return Err(ec::EvalError::NoOracleProjector.into());
    }
    let all = pairs::read(&args.pairs)?;
    let conversations = pairs::conversations(&args.pairs, &all)?;
    let skip = args.skip as usize;
    let indices: Vec<usize> = ec::sample_indices(all.len(), skip + args.n as usize, args.seed)
        .into_iter()
        .skip(skip)
        .collect();
    if indices.len() < 2 {
        return Err(ec::EvalError::TooFew(indices.len()).into());
    }
    let picked: Vec<pairs::Pair> = indices.iter().map(|&i| all[i].clone()).collect();
    let world_contexts = match &args.world_contexts {
        Some(path) => {
            let contexts = pairs::world_contexts(path, &all)?;
            Some(indices.iter().map(|&i| contexts[i].clone()).collect())
        }
        None => None,
    };
    let ids: Vec<String> = indices
        .iter()
        .map(|&i| conversations.ids[i].clone())
        .collect();
    if conversations.source == "chained" {
        eprintln!(
            "note: {} has no conversation sidecar; conversations are inferred from the file's order (chained turns); `make -B data` writes it",
            args.pairs.display()
        );
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
    // Rows for this GGUF from a projector file, checked before any scoring.
    let rows_projector =
        |path: &Option<PathBuf>, mode: &str| -> anyhow::Result<Option<Projector>> {
            let Some(path) = path else { return Ok(None) };
            let projector = Projector::load(path)?;
            let width = decoder.input_width().with_context(|| {
                format!("the {mode} mode needs the llama backend (embedding rows)")
            })?;
            projector.check_width(width, &config_model(decoder))?;
            Ok(Some(projector))
        };
    let soft_prompt = rows_projector(&args.soft_prompt, "soft_prompt")?;
    let oracle_projector = rows_projector(&args.oracle_projector, "oracle")?;
    let mut modes = if args.modes.is_empty() {
        ec::EvalMode::ALL
            .into_iter()
            .filter(|m| control.is_some() || !m.needs_control())
            .filter(|m| soft_prompt.is_some() || !m.needs_soft_prompt())
            .filter(|m| oracle_projector.is_some() || !m.needs_oracle_projector())
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
        soft_prompt,
        oracle_projector,
        world_contexts,
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
    if let Some(path) = &args.per_pair {
        crate::data::write_atomic(path, |out| {
            writeln!(out, "pair\tconversation\tmode\tnll\ttokens")?;
            for ((index, id), score) in indices.iter().zip(&ids).zip(&scores) {
                for (mode, nll) in &score.nll {
                    writeln!(
                        out,
                        "{index}\t{id}\t{}\t{nll:.6}\t{}",
                        mode.name(),
                        score.tokens
                    )?;
                }
            }
            Ok(())
        })?;
    }
    let report = ec::report(
        &scores,
        Some(&ids),
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
        "{} pairs from {} conversations, {} reply tokens; decoder {}; projector {}{}{}",
        report.n,
        report.conversations,
        report.modes.values().next().map_or(0, |m| m.tokens),
        report.gguf,
        report.projector,
        report
            .soft_prompt
            .as_ref()
            .map_or_else(String::new, |s| format!("; soft prompt {s}")),
        report
            .oracle_projector
            .as_ref()
            .map_or_else(String::new, |s| format!("; oracle projector {s}"))
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
        "\n| difference (negative: the first expects the reply more) | mean | 95% interval ({} bootstrap) |\n|---|---:|---|",
        if report.bootstrap == "conversations" {
            "conversation"
        } else {
            "pair"
        }
    )?;
    for (name, d) in &report.paired {
        writeln!(
            out,
            "| {name} | {:+.4} | [{:+.4}, {:+.4}] |",
            d.mean, d.lo, d.hi
        )?;
    }
    if let Some(c) = report.capacity_reached {
        writeln!(
            out,
            "\ncapacity reached, (soft_prompt - prefix) / (soft_prompt - oracle): {:.3} [{:.3}, {:.3}]",
            c.mean, c.lo, c.hi
        )?;
    }
    Ok(())
}

/// The decoder's model file, for error messages.
fn config_model(decoder: &dyn crate::decoder::Decoder) -> String {
    decoder
        .model_path()
        .map_or_else(|| "(no model)".to_string(), |p| p.display().to_string())
}
