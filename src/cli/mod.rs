//! The command-line surface: clap definitions, validation into library
//! configs, and the output formats. `main` only calls [`run`].

mod agent;
mod bench_world;
mod condition;
mod decoder_args;
mod eval_conditioning;
mod fit_control;
mod fit_projector;
mod interrupt;
mod projector;
mod rpc_server;
mod serve;
mod train;
mod train_projector;

pub use interrupt::Interrupted;

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand};

use anyhow::Context;

use crate::world::{Device, LoadOptions, WorldModel, WorldOverrides};

/// Tofy: a world model that reads a prompt and steers a local LLM's reply.
#[derive(Debug, Parser)]
#[command(name = "tofy", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the world model's conditioning vector for each prompt.
    Condition(condition::ConditionArgs),
    /// Turn the chitchat corpus into training and held-out pairs files.
    PrepareChitchat(train::PrepareArgs),
    /// Turn the chatterbot corpus into an out-of-domain held-out pairs file.
    PrepareChatterbot(train::PrepareChatterbotArgs),
    /// Train a world model on a pairs file (needs the `train` feature).
    TrainWorld(train::TrainArgs),
    /// Score a world model on held-out pairs against copy/mean baselines.
    EvalWorld(train::EvalArgs),
    /// Time the world model's forward pass per batch size on a device (and dump its outputs).
    BenchWorld(bench_world::BenchWorldArgs),
    /// Condition a local LLM on the world model and stream its reply.
    InferAgent(agent::InferArgs),
    /// Show which world model, GGUF, backend, threads and GPU layers would be used.
    Doctor(agent::DoctorArgs),
    /// Serve the OpenAI API (chat, completions, models) for OpenCode and other clients.
    Serve(serve::ServeArgs),
    /// Serve this host's GPU (or CPU) to llama.cpp RPC clients (`tofy serve --rpc`).
    RpcServer(rpc_server::RpcServerArgs),
    /// Write a fixed random projector for a GGUF (a placeholder, and a baseline).
    RandomProjector(projector::RandomProjectorArgs),
    /// Does the conditioning help? The decoder's NLL of held-out replies under each mode.
    EvalConditioning(eval_conditioning::EvalConditioningArgs),
    /// Fit a projector (world vector -> K embedding rows) by ridge regression.
    FitProjector(fit_projector::FitProjectorArgs),
    /// Fit a control map (world vector -> a residual-stream direction) by ridge regression.
    FitControl(fit_control::FitControlArgs),
    /// Train a projector by gradient through the frozen decoder (needs the `train` feature).
    TrainProjector(train_projector::TrainProjectorArgs),
}

/// `--world MODEL --vocab VOCAB`: a world-model checkpoint, or the
/// embedded default without them.
#[derive(Debug, Args)]
pub struct WorldArgs {
    /// World-model checkpoint [default: the embedded default].
    #[arg(long, value_name = "MODEL", requires = "vocab")]
    world: Option<std::path::PathBuf>,
    /// Its vocab_world.txt.
    #[arg(long, value_name = "VOCAB", requires = "world")]
    vocab: Option<std::path::PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

impl WorldArgs {
    /// The checkpoint given, or the embedded default, on `--device`.
    pub fn load(&self) -> anyhow::Result<WorldModel> {
        let options = LoadOptions {
            device: self.device.device,
            ..Default::default()
        };
        let world = match (&self.world, &self.vocab) {
            (Some(model), Some(vocab)) => WorldModel::load(model, vocab, &options)?,
            _ => WorldModel::load_default(&options)
                .context("loading the embedded default world model")?,
        };
        if let Some(notice) = world_notice(&world) {
            eprintln!("{notice}");
        }
        Ok(world)
    }
}

/// `--device`: where the world model runs.
#[derive(Debug, Clone, Copy, Args)]
pub struct DeviceArgs {
    /// Where the world model runs: cpu, cuda or cuda:N [default: cuda when a GPU is usable
    /// (builds with the cuda feature), else cpu].
    #[arg(long, env = "TOFY_DEVICE", value_name = "DEVICE", default_value_t = Device::Auto, hide_default_value = true)]
    pub device: Device,
}

/// The notice for a world model that an automatic device choice put on the
/// CPU in a build with CUDA (printed by commands without a decoder).
pub(crate) fn world_notice(world: &WorldModel) -> Option<String> {
    world
        .cpu_fallback()
        .map(|why| format!("note: the world model runs on the CPU: {why}"))
}

/// World-model sizes. The checkpoint's tensor shapes give dim, layers and
/// bridge dim (an argument that disagrees is an error); heads and max_seq
/// come from here, else the checkpoint's metadata, else 8 and 128.
#[derive(Debug, Clone, Copy, Args)]
pub struct WorldSizeArgs {
    /// Encoder width D (checked against encoder.embed.weight).
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u32).range(1..))]
    dim: Option<u32>,
    /// Tokens read per prompt; longer prompts are truncated.
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..))]
    max_seq: Option<u32>,
    /// Number of encoder blocks (checked against the checkpoint).
    #[arg(long, value_name = "L", value_parser = clap::value_parser!(u32).range(1..))]
    layers: Option<u32>,
    /// Attention heads; must divide dim.
    #[arg(long, value_name = "H", value_parser = clap::value_parser!(u32).range(1..))]
    heads: Option<u32>,
    /// Length B of the conditioning vector (checked against decoder_bridge.proj.weight).
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u32).range(1..))]
    bridge_dim: Option<u32>,
}

impl From<WorldSizeArgs> for WorldOverrides {
    fn from(a: WorldSizeArgs) -> Self {
        let n = |v: Option<u32>| v.map(|v| v as usize);
        Self {
            dim: n(a.dim),
            max_seq: n(a.max_seq),
            num_layers: n(a.layers),
            num_heads: n(a.heads),
            bridge_dim: n(a.bridge_dim),
        }
    }
}

/// Parses `args` (program name first) and runs the command. `--help` and
/// `--version` print and exit through clap; an argument error becomes one
/// line, like every other error.
pub fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = seed_form(args.into_iter().map(Into::into).collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            let rendered = err.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            anyhow::bail!(
                "{} (see tofy --help)",
                first.strip_prefix("error: ").unwrap_or(first)
            )
        }
    };
    match cli.command {
        Command::InferAgent(args) => agent::infer(args),
        Command::Doctor(args) => agent::doctor(args),
        Command::Serve(args) => serve::run(args),
        Command::RpcServer(args) => rpc_server::run(args),
        Command::RandomProjector(args) => projector::run(args),
        Command::EvalConditioning(args) => eval_conditioning::run(args),
        Command::FitProjector(args) => fit_projector::run(args),
        Command::FitControl(args) => fit_control::run(args),
        Command::TrainProjector(args) => train_projector::run(args),
        Command::Condition(args) => condition::run(args),
        Command::PrepareChitchat(args) => train::prepare(args),
        Command::PrepareChatterbot(args) => train::prepare_chatterbot(args),
        Command::TrainWorld(args) => train::train(args),
        Command::EvalWorld(args) => train::evaluate(args),
        Command::BenchWorld(args) => bench_world::run(args),
    }
}

/// The seed spelled commands as flags (`tofy --infer-agent ...`,
/// `tofy --train-world ...`); they mean the subcommands of the same name.
fn seed_form(mut args: Vec<OsString>) -> Vec<OsString> {
    const SEED_COMMANDS: [&str; 5] = [
        "--infer-agent",
        "--serve",
        "--train-world",
        "--eval-world",
        "--condition",
    ];
    if let Some(first) = args.get_mut(1)
        && let Some(name) = first.to_str().filter(|a| SEED_COMMANDS.contains(a))
    {
        *first = OsString::from(&name[2..]);
    }
    args
}

/// A world model named on the command line, or the embedded default.
pub(crate) enum WorldSpec<'a> {
    Files { model: &'a str, vocab: &'a str },
    Default,
}

impl WorldSpec<'_> {
    pub(crate) fn load(&self, options: &LoadOptions) -> anyhow::Result<WorldModel> {
        match self {
            Self::Files { model, vocab } => Ok(WorldModel::load(model, vocab, options)?),
            Self::Default => WorldModel::load_default(options)
                .context("loading the embedded default world model"),
        }
    }
}

/// Splits `[MODEL VOCAB] REST...` the way the seed's commands take them:
/// the first two arguments are a world model and its vocab when the first
/// ends in `.safetensors`, or when both name something on disk (so a
/// one-word prompt that happens to be a folder name, `tofy infer-agent
/// docs`, stays a prompt). Otherwise every argument belongs to the command
/// and the embedded default world model is used. `usage` is the command's
/// argument synopsis; with `rest_required`, something must follow.
pub(crate) fn split_world<'a>(
    args: &'a [String],
    usage: &str,
    rest_required: bool,
) -> anyhow::Result<(WorldSpec<'a>, &'a [String])> {
    let exists = |arg: &str| std::path::Path::new(arg).exists();
    let names_model = |arg: &str| arg.ends_with(".safetensors");
    match args {
        [model, vocab, rest @ ..] if names_model(model) || (exists(model) && exists(vocab)) => {
            anyhow::ensure!(
                !rest_required || !rest.is_empty(),
                "{model} and {vocab} name a world model, but nothing follows them; usage: {usage}"
            );
            Ok((WorldSpec::Files { model, vocab }, rest))
        }
        [model] if names_model(model) => {
            anyhow::bail!(
                "{model} looks like a world model, but no vocab_world.txt follows it; usage: {usage}"
            )
        }
        _ => Ok((WorldSpec::Default, args)),
    }
}

/// [`split_world`], then load the world model.
pub(crate) fn world_and_rest<'a>(
    args: &'a [String],
    options: &LoadOptions,
) -> anyhow::Result<(WorldModel, &'a [String])> {
    let (spec, rest) = split_world(args, "[MODEL VOCAB] PROMPT...", true)?;
    Ok((spec.load(options)?, rest))
}
