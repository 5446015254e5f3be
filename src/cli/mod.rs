//! The command-line surface: clap definitions, validation into library
//! configs, and the output formats. `main` only calls [`run`].

mod condition;

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand};

use crate::world::WorldOverrides;

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

/// Parses `args` (program name first) and runs the command. Argument errors
/// and `--help` exit the process through clap, as users expect.
pub fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match Cli::parse_from(args).command {
        Command::Condition(args) => condition::run(args),
    }
}
