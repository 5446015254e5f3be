//! The decoder's command-line flags, each backed by the seed's environment
//! variable (clap shows it in `--help`; a bad value is an error naming both,
//! never a silent fallback to the default).

use std::path::PathBuf;

use clap::Args;

use crate::conditioning::{CondFormat, CondMode};
use crate::decoder::config::{
    self, CacheType, DEFAULT_BIN, DEFAULT_CTX, DEFAULT_MIN_P, DEFAULT_NGL, DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P,
};
use crate::decoder::{BackendKind, Decoder, DecoderConfig, Sampling};
use crate::engine::CondSettings;
use crate::projector::{Projector, ProjectorError};

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Decoder")]
pub struct DecoderArgs {
    /// Decoder backend [default: llama; subprocess when JEPA_DECODER_BIN is set].
    #[arg(long, env = "JEPA_DECODER_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// GGUF model [default: first of ./models/*.gguf, then ./models/**/*.gguf].
    #[arg(
        long = "decoder-model",
        env = "JEPA_DECODER_MODEL",
        value_name = "GGUF"
    )]
    pub model: Option<String>,
    /// llama.cpp binary for the subprocess backend [default: llama-completion].
    #[arg(long = "decoder-bin", env = "JEPA_DECODER_BIN", value_name = "BIN")]
    pub bin: Option<String>,
    /// Context window in tokens.
    #[arg(long, env = "JEPA_DECODER_CTX", default_value_t = DEFAULT_CTX, value_name = "N",
          value_parser = parse_ctx)]
    pub ctx: u32,
    /// Layers offloaded to the GPU (ignored, with a notice, by a CPU-only build).
    #[arg(long, env = "JEPA_DECODER_NGL", default_value_t = DEFAULT_NGL, value_name = "N",
          value_parser = parse_ngl, allow_negative_numbers = true)]
    pub ngl: u32,
    /// llama.cpp RPC servers (`tofy rpc-server` on other hosts) that take the offloaded layers:
    /// `host:port,host:port` (deploy/README.md).
    #[arg(long, env = "TOFY_RPC", value_name = "HOST:PORT,...", value_delimiter = ',',
          value_parser = parse_endpoint)]
    pub rpc: Vec<String>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, env = "JEPA_DECODER_TEMP", default_value_t = DEFAULT_TEMP, value_name = "T",
          value_parser = parse_temp, allow_negative_numbers = true)]
    pub temp: f32,
    /// Repeat penalty over the last 64 tokens (1 = off).
    #[arg(long, env = "JEPA_DECODER_REPEAT_PENALTY", default_value_t = DEFAULT_REPEAT_PENALTY,
          value_name = "F", value_parser = parse_repeat_penalty, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Top-k sampling (0 = off).
    #[arg(long, env = "JEPA_DECODER_TOP_K", default_value_t = DEFAULT_TOP_K, value_name = "K",
          value_parser = parse_top_k, allow_negative_numbers = true)]
    pub top_k: i32,
    /// Top-p (nucleus) sampling (1 = off).
    #[arg(long, env = "JEPA_DECODER_TOP_P", default_value_t = DEFAULT_TOP_P, value_name = "P",
          value_parser = parse_top_p, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Min-p sampling (0 = off).
    #[arg(long, env = "JEPA_DECODER_MIN_P", default_value_t = DEFAULT_MIN_P, value_name = "P",
          value_parser = parse_min_p, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Sampling seed [default: random per request].
    #[arg(long, env = "JEPA_DECODER_SEED", value_name = "N", value_parser = parse_seed)]
    pub seed: Option<u32>,
    /// CPU threads for llama.cpp [default: physical cores].
    #[arg(long, env = "JEPA_DECODER_THREADS", value_name = "N", value_parser = parse_threads)]
    pub threads: Option<u32>,
    /// KV cache of the llama backend: q8_0 runs flash attention in half the
    /// memory; f16 runs without flash attention, 5-15% slower.
    #[arg(long, env = "TOFY_CACHE_TYPE", value_enum, default_value_t = CacheType::default())]
    pub cache_type: CacheType,
    /// How the conditioning vector is written into the prompt (text mode).
    #[arg(long, env = "JEPA_DECODER_COND_FORMAT", value_enum, default_value_t = CondFormat::Chunks)]
    pub cond_format: CondFormat,
    /// How the conditioning reaches the decoder: text (numbers in the system message), prefix
    /// (projected embedding rows in their place), cvec, none [default: prefix where the llama
    /// backend runs a GGUF that a projector reading the world model's vectors was made for
    /// (--projector, or the embedded one on SmolLM2-135M-Instruct.Q4_1.gguf), else text].
    #[arg(long, env = "JEPA_DECODER_COND_MODE", value_enum)]
    pub cond_mode: Option<CondMode>,
    /// Projector for prefix mode (safetensors) [default: the embedded trained one for
    /// SmolLM2-135M-Instruct].
    #[arg(long, env = "TOFY_PROJECTOR", value_name = "FILE")]
    pub projector: Option<PathBuf>,
    /// Control map for cvec mode (`tofy fit-control`): the world vector to a control vector
    /// added to the decoder's residual stream.
    #[arg(long, env = "TOFY_CONTROL", value_name = "FILE")]
    pub control: Option<PathBuf>,
    /// The strength the control map's vectors are added with.
    #[arg(long, env = "TOFY_CONTROL_STRENGTH", default_value_t = 1.0, value_name = "S",
          allow_negative_numbers = true, value_parser = parse_strength)]
    pub control_strength: f32,
}

impl DecoderArgs {
    /// `JEPA_DECODER_BIN`, unless unset or empty (an empty variable counts
    /// as unset, as in the seed).
    pub fn bin(&self) -> Option<&str> {
        self.bin.as_deref().filter(|b| !b.is_empty())
    }

    /// The conditioning mode and format.
    pub fn cond_settings(&self) -> CondSettings {
        CondSettings {
            mode: self.cond_mode,
            format: self.cond_format,
        }
    }

    /// `--projector`, loaded, or `None` for the embedded default.
    pub fn projector(&self) -> Result<Option<Projector>, ProjectorError> {
        self.projector
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Projector::load)
            .transpose()
    }

    /// `--control`, loaded and checked to be a control map, with its
    /// strength; `None` without one.
    pub fn control(&self) -> Result<Option<(Projector, f32)>, ProjectorError> {
        let Some(path) = self
            .control
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
        else {
            return Ok(None);
        };
        let map = Projector::load(path)?;
        if map.control_layers().is_none() || map.k() != 1 {
            return Err(ProjectorError::NotControl {
                path: path.display().to_string(),
                k: map.k(),
            });
        }
        Ok(Some((map, self.control_strength)))
    }

    pub fn config(&self) -> DecoderConfig {
        DecoderConfig {
            backend: BackendKind::select(self.backend, self.bin().is_some()),
            model: self
                .model
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(PathBuf::from),
            search_root: PathBuf::from("."),
            bin: self.bin().unwrap_or(DEFAULT_BIN).to_string(),
            ctx: self.ctx,
            ngl: self.ngl,
            threads: self
                .threads
                .map_or_else(config::physical_cores, |t| t as usize),
            parallel: 1,
            cache_type: self.cache_type,
            sampling: Sampling {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                seed: self.seed,
            },
            split_mixed_batches: false,
            rpc: self.rpc.clone(),
            cancel_load: None,
        }
    }
}

/// A `host:port` RPC endpoint. IPv4 or a name only: llama.cpp splits an
/// endpoint at its first ':' and resolves names to IPv4.
fn parse_endpoint(s: &str) -> Result<String, String> {
    match s.trim().split_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(['[', ']'])
                && port.parse::<u16>().is_ok_and(|p| p > 0) =>
        {
            Ok(s.trim().to_string())
        }
        _ => Err(format!(
            "'{s}' is not an RPC endpoint: TOFY_RPC / --rpc takes IPv4 host:port (or name:port), comma-separated"
        )),
    }
}

/// Parses `s` as a `T` that `ok` accepts; otherwise the error `what`, which
/// names both the variable and the flag.
fn parse_checked<T: std::str::FromStr>(
    s: &str,
    what: &str,
    ok: impl Fn(&T) -> bool,
) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .ok()
        .filter(ok)
        .ok_or_else(|| what.to_string())
}

fn parse_ctx(s: &str) -> Result<u32, String> {
    let what = "JEPA_DECODER_CTX / --ctx must be a whole number of tokens, at least 1";
    parse_checked(s, what, |&n| n >= 1)
}

fn parse_ngl(s: &str) -> Result<u32, String> {
    let what =
        "JEPA_DECODER_NGL / --ngl must be a whole number of layers, 0 or more (0 = CPU only)";
    parse_checked(s, what, |_| true)
}

fn parse_temp(s: &str) -> Result<f32, String> {
    let what = "JEPA_DECODER_TEMP / --temp must be a number, 0 or more";
    parse_checked(s, what, |v: &f32| v.is_finite() && *v >= 0.0)
}

fn parse_repeat_penalty(s: &str) -> Result<f32, String> {
    let what = "JEPA_DECODER_REPEAT_PENALTY / --repeat-penalty must be a number above 0 (1 = off)";
    parse_checked(s, what, |v: &f32| v.is_finite() && *v > 0.0)
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    let what = "JEPA_DECODER_TOP_P / --top-p must be in (0, 1]";
    parse_checked(s, what, |&v| v > 0.0 && v <= 1.0)
}

fn parse_min_p(s: &str) -> Result<f32, String> {
    let what = "JEPA_DECODER_MIN_P / --min-p must be in [0, 1]";
    parse_checked(s, what, |v| (0.0..=1.0).contains(v))
}

fn parse_top_k(s: &str) -> Result<i32, String> {
    let what = "JEPA_DECODER_TOP_K / --top-k must be a whole number, 0 or more (0 = off)";
    parse_checked(s, what, |&k| k >= 0)
}

fn parse_seed(s: &str) -> Result<u32, String> {
    let what = "JEPA_DECODER_SEED / --seed must be a whole number from 0 to 4294967295";
    parse_checked(s, what, |_| true)
}

fn parse_strength(s: &str) -> Result<f32, String> {
    s.parse::<f32>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("'{s}' is not a finite number"))
}

fn parse_threads(s: &str) -> Result<u32, String> {
    let what = "JEPA_DECODER_THREADS / --threads must be a whole number, at least 1";
    parse_checked(s, what, |&n| n >= 1)
}

/// The decoder's GGUF and the text that ends its assistant turns, for a
/// `command` that reads replies through the llama backend's tokenizer.
pub fn gguf_and_end_of_turn(
    decoder: &dyn Decoder,
    command: &str,
) -> anyhow::Result<(PathBuf, String)> {
    use anyhow::Context;
    let gguf = decoder
        .model_path()
        .with_context(|| {
            format!(
                "{command} needs a decoder GGUF: set JEPA_DECODER_MODEL or put one under ./models"
            )
        })?
        .to_path_buf();
    let end_of_turn = decoder.end_of_turn().with_context(|| {
        format!(
            "the {} backend has no tokenizer to read replies with; {command} needs the llama backend",
            decoder.backend().name()
        )
    })?;
    Ok((gguf, end_of_turn))
}
