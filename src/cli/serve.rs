//! `tofy serve`: the OpenAI-compatible server, in the seed's form
//! (`tofy --serve MODEL VOCAB 0.0.0.0:8080 368 128 4 8 256`) or with the
//! embedded default world model (`tofy serve`).

use std::net::TcpListener;

use anyhow::Context;
use clap::Args;

use super::agent::{merge, notices, positive};
use super::decoder_args::DecoderArgs;
use super::{DeviceArgs, WorldSizeArgs, split_world};
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
    #[command(flatten)]
    device: DeviceArgs,
    /// Sequences decoded together in one llama.cpp context (each gets --ctx tokens).
    #[arg(long, env = "TOFY_PARALLEL", default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    parallel: u32,
    /// Requests that may wait for a sequence; beyond them the server answers 503.
    #[arg(long, env = "TOFY_QUEUE", default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=65536))]
    queue: u32,
    /// Require `Authorization: Bearer KEY` on every route but /health (/metrics included).
    #[arg(long, env = "TOFY_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
    /// Seconds of silence after which a stream gets an SSE keep-alive comment.
    #[arg(long, default_value_t = 10.0, value_name = "SECS",
          value_parser = keep_alive_secs)]
    sse_keepalive: f64,
    /// Log lines as text, or one JSON object each (for log shippers). `RUST_LOG` filters them
    /// (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "TOFY_LOG_FORMAT")]
    log_format: LogFormat,
    /// max_tokens for requests that give none (bounded by the context).
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    default_max_tokens: u32,
    /// This replica's name, in `/health`, on every metric (`replica` label) and in each
    /// response's `X-Tofy-Replica` header (default: the host name).
    #[arg(long, env = "TOFY_REPLICA_ID", value_name = "ID", value_parser = replica_id)]
    replica_id: Option<String>,
    /// Seconds that in-flight requests get to finish after SIGTERM or SIGINT (`/health`
    /// answers 503 and new generations are refused meanwhile); a second signal stops at once.
    #[arg(long, env = "TOFY_DRAIN_TIMEOUT", default_value_t = 30.0, value_name = "SECS",
          value_parser = drain_secs)]
    drain_timeout: f64,
    #[command(flatten)]
    decoder: DecoderArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn keep_alive_secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "'{text}' is not a number of seconds from 0.1 to 3600"
        )),
    }
}

fn drain_secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.0..=86400.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "'{text}' is not a number of seconds from 0 to 86400"
        )),
    }
}

/// A replica id goes into a header and a Prometheus label, so it is kept
/// to the characters both take as they are.
fn replica_id(text: &str) -> Result<String, String> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_.:".contains(&b);
    if (1..=64).contains(&text.len()) && text.bytes().all(plain) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "'{text}' is not a replica id: use 1 to 64 letters, digits, '-', '_', '.' or ':'"
        ))
    }
}

/// The host name, as a replica id (`tofy` when it is not a valid one).
fn default_replica_id() -> String {
    let host = gethostname::gethostname();
    host.to_str()
        .and_then(|h| replica_id(h).ok())
        .unwrap_or_else(|| "tofy".to_string())
}

/// The log on stderr: `RUST_LOG` filters (default `info`), text or JSON.
/// Prompts are never logged at info, nor the API key at any level.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
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
        device: args.device.device,
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
    if args.log_format == LogFormat::Json {
        tracing::info!(%address, base_url = %format!("http://{host}/v1"), "listening");
    } else {
        eprintln!("tofy serve: listening on http://{address}");
        eprintln!(
            "  POST /v1/chat/completions, POST /v1/completions, GET /v1/models (also without /v1), GET /health, GET /metrics"
        );
        eprintln!(
            "  OpenCode / OpenAI clients: base URL http://{host}/v1, model \"tofy\" (docs/opencode.json)"
        );
    }
    let has_key = args.api_key.as_ref().is_some_and(|k| !k.is_empty());
    if !address.ip().is_loopback() && !has_key {
        tracing::warn!(
            %address,
            "listening beyond this machine with no API key: anyone who can reach {address} can use the model; pass --api-key (or TOFY_API_KEY), or bind 127.0.0.1"
        );
    }

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
        keep_alive: std::time::Duration::from_secs_f64(args.sse_keepalive),
        replica: args.replica_id.unwrap_or_else(default_replica_id),
        drain_timeout: std::time::Duration::from_secs_f64(args.drain_timeout),
    };
    let settings = args.decoder.cond_settings();
    let control = args.decoder.control()?;
    let load = move |cancel| {
        let config = DecoderConfig {
            cancel_load: Some(cancel),
            ..config
        };
        let engine = Engine::new(world, decoder::open(&config)?, settings, projector)?
            .with_control(control)?;
        for notice in notices(&engine, &config) {
            tracing::warn!("{notice}");
        }
        Ok(engine)
    };
    server::serve(load, options).context("tofy serve")
}
