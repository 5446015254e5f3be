//! Decoder settings: the seed's environment variables (`JEPA_DECODER_*`),
//! their defaults, and the backend selection rule. Parsing the variables is
//! the CLI's job (clap, so that `--help` shows each one and a bad value is an
//! error rather than a silent default); this module holds the result.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The seed's defaults.
pub const DEFAULT_CTX: u32 = 4096;
pub const DEFAULT_NGL: u32 = 99;
pub const DEFAULT_TEMP: f32 = 0.7;
pub const DEFAULT_REPEAT_PENALTY: f32 = 1.12;
pub const DEFAULT_BIN: &str = "llama-completion";
pub const DEFAULT_MAX_NEW_TOKENS: usize = 4096;
/// llama.cpp's own sampling defaults (common/common.h).
pub const DEFAULT_TOP_K: i32 = 40;
pub const DEFAULT_TOP_P: f32 = 0.95;
pub const DEFAULT_MIN_P: f32 = 0.05;
/// Tokens the repeat penalty looks back over (llama.cpp's default).
pub const PENALTY_LAST_N: i32 = 64;

/// Which backend generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// llama.cpp in-process (llama-cpp-2).
    Llama,
    /// One llama-completion process per request (the seed's backend).
    Subprocess,
    /// A deterministic placeholder reply.
    Stub,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Subprocess => "subprocess",
            Self::Stub => "stub",
        }
    }

    /// The seed's rule: `JEPA_DECODER_BACKEND` wins; otherwise setting
    /// `JEPA_DECODER_BIN` asks for the subprocess backend; otherwise llama.cpp
    /// in-process. (A missing model turns any of them into the stub later.)
    pub fn select(explicit: Option<Self>, bin_set: bool) -> Self {
        match explicit {
            Some(kind) => kind,
            None if bin_set => Self::Subprocess,
            None => Self::Llama,
        }
    }
}

/// The type of the KV cache's keys and values, which also decides how
/// attention runs (docs/decoder.md, "Batch invariance").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CacheType {
    /// 8-bit blocks (llama.cpp's `-ctk q8_0 -ctv q8_0`) with flash
    /// attention: half the memory of f16, and the faster attention.
    #[default]
    #[value(name = "q8_0")]
    Q8_0,
    /// 16-bit floats, attention without flash attention (5-15% slower at
    /// 8 streams on the dev machine, BENCHMARKS.md).
    F16,
}

/// How to pick each token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 or below: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: i32,
    /// 1.0: off.
    pub top_p: f32,
    /// 0.0: off.
    pub min_p: f32,
    /// 1.0: off.
    pub repeat_penalty: f32,
    /// OpenAI's presence and frequency penalties; 0.0: off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// None: a fresh random seed per generation.
    pub seed: Option<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: DEFAULT_TEMP,
            top_k: DEFAULT_TOP_K,
            top_p: DEFAULT_TOP_P,
            min_p: DEFAULT_MIN_P,
            repeat_penalty: DEFAULT_REPEAT_PENALTY,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl Sampling {
    /// Deterministic: always the most likely token (after the penalties).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// Everything needed to open a decoder.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub backend: BackendKind,
    /// `JEPA_DECODER_MODEL`: an explicit .gguf (an error if missing).
    pub model: Option<PathBuf>,
    /// Where `models/*.gguf` and `models/**/*.gguf` are searched (the
    /// working directory, as in the seed).
    pub search_root: PathBuf,
    /// `JEPA_DECODER_BIN` for the subprocess backend.
    pub bin: String,
    /// `JEPA_DECODER_CTX`: context window in tokens (≥ 1).
    pub ctx: u32,
    /// `JEPA_DECODER_NGL`: layers offloaded to the GPU.
    pub ngl: u32,
    /// CPU threads for llama.cpp.
    pub threads: usize,
    /// Sequences the llama backend decodes together (the server's
    /// `--parallel`); each gets `ctx` tokens of its own.
    pub parallel: usize,
    /// KV cache type (and with it, flash attention).
    pub cache_type: CacheType,
    /// Sampling defaults for requests that do not set their own.
    pub sampling: Sampling,
    /// Never mix token rows and embedding rows in one llama.cpp batch (the
    /// fallback for architectures that refuse the mix), whatever the
    /// model. For tests and debugging; results are the same either way.
    pub split_mixed_batches: bool,
    /// `TOFY_RPC`: llama.cpp RPC servers (`host:port`) that take the
    /// offloaded layers, in order (llama backend only).
    pub rpc: Vec<String>,
    /// Set by whoever stops the process (a signal while the server loads,
    /// Ctrl-C in the CLI): a llama.cpp model load in progress gives up
    /// ([`super::DecoderError::LoadCancelled`]) instead of finishing first.
    pub cancel_load: Option<Arc<AtomicBool>>,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Llama,
            model: None,
            search_root: PathBuf::from("."),
            bin: DEFAULT_BIN.to_string(),
            ctx: DEFAULT_CTX,
            ngl: DEFAULT_NGL,
            threads: physical_cores(),
            parallel: 1,
            cache_type: CacheType::default(),
            sampling: Sampling::default(),
            split_mixed_batches: false,
            rpc: Vec::new(),
            cancel_load: None,
        }
    }
}

/// Physical cores: llama.cpp decodes slower with one thread per hyperthread
/// (measured on this project's 2-core machine: 4 threads 35 tok/s, 2
/// threads 69 tok/s on SmolLM2-135M).
/// Capped by the CPUs this process may use (cgroup quota, affinity), which
/// /proc/cpuinfo's physical count ignores.
pub fn physical_cores() -> usize {
    num_cpus::get_physical().min(num_cpus::get()).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_selection_follows_the_seed() {
        use BackendKind::*;
        assert_eq!(BackendKind::select(None, false), Llama);
        assert_eq!(BackendKind::select(None, true), Subprocess);
        assert_eq!(BackendKind::select(Some(Llama), true), Llama);
        assert_eq!(BackendKind::select(Some(Stub), false), Stub);
        assert_eq!(BackendKind::select(Some(Subprocess), false), Subprocess);
    }
}
