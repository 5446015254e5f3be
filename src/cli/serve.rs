//! `tofy serve`: the OpenAI-compatible server, in the seed's form
//! (`tofy --serve MODEL VOCAB 0.0.0.0:8080 368 128 4 8 256`) or with the
//! embedded default world model (`tofy serve`).

use std::net::TcpListener;

use anyhow::Context;
use clap::Args;

use super::agent::{merge, positive, print_notices};
use super::decoder_args::DecoderArgs;
use super::{WorldSizeArgs, split_world};
use crate::decoder::config::DEFAULT_MAX_NEW_TOKENS;
use crate::decoder::{self, DecoderConfig};
use crate::engine::Engine;
use crate::server::{self, ServeOptions};
use crate::world::{LoadOptions, WorldOverrides};

const USAGE: &str = "tofy serve [MODEL VOCAB] [BIND] [DIM MAX_SEQ LAYERS HEADS BRIDGE_DIM]";
const DEFAULT_BIND: &str = "127.0.0.1:8080";
const SIZE_NAMES: [&str; 5] = ["dim", "max_seq", "layers", "heads", "bridge_dim"];

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// `[MODEL VOCAB] [BIND] [DIM MAX_SEQ LAYERS HEADS BRIDGE_DIM]`, the seed's order. Without
    /// MODEL VOCAB the embedded default world model is used; BIND defaults to 127.0.0.1:8080
    /// (port 0 picks a free one); the sizes are checked against the checkpoint.
    #[arg(value_name = "ARGS")]
    inputs: Vec<String>,
    #[command(flatten)]
    sizes: WorldSizeArgs,
    /// Sequences decoded together in one llama.cpp context (each gets --ctx tokens).
    #[arg(long, env = "TOFY_PARALLEL", default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    parallel: u32,
    /// Requests that may wait for a sequence; beyond them the server answers 503.
    #[arg(long, env = "TOFY_QUEUE", default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=65536))]
    queue: u32,
    /// Require `Authorization: Bearer KEY` on the API routes (not on /health, /metrics).
    #[arg(long, env = "TOFY_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
    /// max_tokens for requests that give none (bounded by the context).
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    default_max_tokens: u32,
    #[command(flatten)]
    decoder: DecoderArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (spec, rest) = split_world(&args.inputs, USAGE, false)?;
    let (bind, numbers) = match rest.split_first() {
        Some((first, numbers)) if first.contains(':') => (first.as_str(), numbers),
        _ => (DEFAULT_BIND, rest),
    };
    anyhow::ensure!(
        numbers.len() <= SIZE_NAMES.len(),
        "too many arguments: '{}'; usage: {USAGE}",
        numbers[SIZE_NAMES.len().min(numbers.len())..].join(" ")
    );
    let mut sizes = [None; 5];
    for (i, (text, name)) in numbers.iter().zip(SIZE_NAMES).enumerate() {
        sizes[i] = Some(positive(text, name).with_context(|| {
            format!("(an address needs a port, as in 0.0.0.0:8080); usage: {USAGE}")
        })?);
    }
    let positional = WorldOverrides {
        dim: sizes[0],
        max_seq: sizes[1],
        num_layers: sizes[2],
        num_heads: sizes[3],
        bridge_dim: sizes[4],
    };
    let options = LoadOptions {
        overrides: merge(args.sizes.into(), positional),
        ..Default::default()
    };
    let world = spec.load(&options)?;
    let projector = args.decoder.projector()?;

    let listener = TcpListener::bind(bind).with_context(|| {
        format!("cannot listen on {bind} (address in use or not local?); pass another BIND such as 127.0.0.1:8081")
    })?;
    let address = listener.local_addr()?;
    // A wildcard bind is reached through localhost.
    let host = if address.ip().is_unspecified() {
        format!("localhost:{}", address.port())
    } else {
        address.to_string()
    };
    eprintln!("tofy serve: listening on http://{address}");
    eprintln!(
        "  POST /v1/chat/completions, POST /v1/completions, GET /v1/models (also without /v1), GET /health, GET /metrics"
    );
    eprintln!(
        "  OpenCode / OpenAI clients: base URL http://{host}/v1, model \"tofy\" (docs/opencode.json)"
    );

    let config = DecoderConfig {
        parallel: args.parallel as usize,
        ..args.decoder.config()
    };
    let options = ServeOptions {
        listener,
        parallel: args.parallel as usize,
        queue: args.queue as usize,
        api_key: args.api_key,
        sampling: config.sampling.clone(),
        max_tokens: args.default_max_tokens as usize,
    };
    let settings = args.decoder.cond_settings();
    let control = args.decoder.control()?;
    let load = move || {
        let engine = Engine::new(world, decoder::open(&config)?, settings, projector)?
            .with_control(control)?;
        print_notices(engine.decoder(), &config);
        Ok(engine)
    };
    server::serve(load, options).context("tofy serve")
}
