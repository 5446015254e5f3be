//! The world model: reads a prompt and predicts the conditioning vector for
//! the reply (../shared/specs/world-checkpoint.md).
//!
//! [`WorldModel`] is the entry point: it loads a checkpoint and its vocab,
//! resolves the sizes ([`config`]), tokenizes ([`tokenizer`]) and hands the
//! ids to a [`WorldBackend`]: [`cpu`], or `cuda` in a build with the `cuda`
//! feature, chosen by [`Device`] ([`device`]).

pub mod checkpoint;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod default;
pub mod device;
mod error;
pub mod tokenizer;
pub mod vocab;

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};

pub use checkpoint::Checkpoint;
pub use config::{WorldConfig, WorldOverrides};
pub use device::Device;
pub use error::{Result, WorldError};
pub use tokenizer::{Encoded, encode, tokenize};
pub use vocab::Vocab;

/// Prompts per forward call: bounds activation memory (about
/// `max_seq · 4·dim · 4 bytes` per prompt and layer) for large batches.
pub(crate) const MAX_BATCH: usize = 32;
/// The most prompts one backend forward pass takes ([`WorldModel::forward`]
/// splits larger batches).
pub const MAX_FORWARD_BATCH: usize = MAX_BATCH;

/// A compute backend for the forward pass, chosen once at load time.
pub trait WorldBackend: Send + Sync {
    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// The device in words, for `tofy doctor` and logs.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// The forward pass for prompts already mapped to ids; each holds
    /// between 1 and max_seq ids.
    fn forward(&self, batch: &[&[u32]]) -> Result<WorldOutputs>;

    /// The bridge alone, for `[N, dim]` latents: `[N, bridge_dim]`.
    fn bridge(&self, latents: ArrayView2<f32>) -> Result<Array2<f32>>;
}

/// What the forward pass computes for a batch, one row per prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldOutputs {
    /// Pooled state latents `[N, dim]`.
    pub state: Array2<f32>,
    /// Predicted next latents `[N, dim]` (transition, action "reply").
    pub next: Array2<f32>,
    /// Conditioning vectors `[N, bridge_dim]`.
    pub conditioning: Array2<f32>,
}

/// How to load a world model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Sizes given by the user; unset ones come from the checkpoint.
    pub overrides: WorldOverrides,
    /// CPU worker threads; `None` uses every available core.
    pub threads: Option<usize>,
    /// Accept a training-only EMA teacher checkpoint (eval-world encodes
    /// targets with it); refused otherwise, as it is not what users mean.
    pub allow_teacher: bool,
    /// Where to run ([`Device::Auto`]: the GPU when there is one).
    pub device: Device,
}

/// One prompt's conditioning.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioned {
    /// Real (unpadded) positions the model read: tokens after truncation.
    pub tokens: usize,
    /// Tokens in the prompt before truncation to max_seq.
    pub total_tokens: usize,
    /// The conditioning vector, `bridge_dim` long.
    pub vector: Vec<f32>,
}

/// A loaded world model: sizes, vocabulary and a backend holding the weights.
pub struct WorldModel {
    config: WorldConfig,
    vocab: Vocab,
    backend: Box<dyn WorldBackend>,
    /// Why [`Device::Auto`] settled for the CPU in a build with CUDA.
    cpu_fallback: Option<String>,
    model_path: PathBuf,
}

impl WorldModel {
    /// Loads `model` (safetensors) and `vocab` (vocab_world.txt), checking
    /// every tensor and the vocabulary size before any weight is copied.
    pub fn load(
        model: impl AsRef<Path>,
        vocab: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let vocab_path = vocab.as_ref();
        Self::from_parts(
            Checkpoint::open(model.as_ref())?,
            vocab_path,
            || Vocab::load(vocab_path),
            options,
        )
    }

    /// Loads the world model compiled into the binary ([`default`]).
    pub fn load_default(options: &LoadOptions) -> Result<Self> {
        let ckpt = Checkpoint::from_static(default::MODEL_PATH, default::MODEL)?;
        let vocab_path = Path::new(default::VOCAB_PATH);
        Self::from_parts(
            ckpt,
            vocab_path,
            || Vocab::parse(vocab_path, default::VOCAB),
            options,
        )
    }

    /// Loads a checkpoint and a vocab from bytes in memory, as [`load`]
    /// reads files (the fuzz targets' way in); `name` stands in for the
    /// paths in messages.
    ///
    /// [`load`]: Self::load
    pub fn from_bytes(
        name: &str,
        model: Vec<u8>,
        vocab: &[u8],
        options: &LoadOptions,
    ) -> Result<Self> {
        let vocab_path = Path::new(name);
        Self::from_parts(
            Checkpoint::from_bytes(name, model)?,
            vocab_path,
            || Vocab::parse(vocab_path, vocab),
            options,
        )
    }

    /// Checks the checkpoint and the vocab against each other, then loads
    /// the weights into the backend. The vocab is read only once the
    /// checkpoint's sizes are known to be sound.
    fn from_parts(
        ckpt: Checkpoint,
        vocab_path: &Path,
        read_vocab: impl FnOnce() -> Result<Vocab>,
        options: &LoadOptions,
    ) -> Result<Self> {
        if ckpt.is_teacher() && !options.allow_teacher {
            return Err(WorldError::Teacher {
                path: ckpt.path().to_path_buf(),
            });
        }
        let config = config::resolve(&ckpt, &options.overrides)?;
        let vocab = read_vocab()?;
        if vocab.len() != config.vocab_size {
            return Err(WorldError::VocabMismatch {
                vocab_path: vocab_path.to_path_buf(),
                model_path: ckpt.path().to_path_buf(),
                vocab: vocab.len(),
                rows: config.vocab_size,
            });
        }
        let (backend, cpu_fallback) = load_backend(&ckpt, &config, options)?;
        Ok(Self {
            config,
            vocab,
            backend,
            cpu_fallback,
            model_path: ckpt.path().to_path_buf(),
        })
    }

    /// The model's sizes.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// The model's vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The backend's name ("cpu", "cuda").
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The device the forward pass runs on, in words.
    pub fn device_description(&self) -> String {
        self.backend.describe()
    }

    /// Why the world model runs on the CPU although this build has CUDA and
    /// no device was named (no driver, no GPU, ...); `None` otherwise.
    pub fn cpu_fallback(&self) -> Option<&str> {
        self.cpu_fallback.as_deref()
    }

    /// The checkpoint file the weights came from.
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    /// Tokenizes every prompt; the first one with no tokens is an error
    /// naming its 1-based position.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Encoded>> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                encode(&self.vocab, p.as_ref(), self.config.max_seq)
                    .ok_or(WorldError::EmptyPrompt { index: i + 1 })
            })
            .collect()
    }

    /// The full forward pass for encoded prompts, in forward calls of at
    /// most [`MAX_BATCH`] prompts whose rows are concatenated.
    pub fn forward(&self, encoded: &[Encoded]) -> Result<WorldOutputs> {
        let mut parts = Vec::new();
        for chunk in encoded.chunks(MAX_BATCH) {
            let ids: Vec<&[u32]> = chunk.iter().map(|e| e.ids.as_slice()).collect();
            parts.push(self.backend.forward(&ids)?);
        }
        let stack = |pick: fn(&WorldOutputs) -> &Array2<f32>, cols: usize| {
            let views: Vec<_> = parts.iter().map(|p| pick(p).view()).collect();
            if views.is_empty() {
                Array2::zeros((0, cols))
            } else {
                ndarray::concatenate(ndarray::Axis(0), &views).expect("same widths")
            }
        };
        let (d, b) = (self.config.dim, self.config.bridge_dim);
        Ok(WorldOutputs {
            state: stack(|p| &p.state, d),
            next: stack(|p| &p.next, d),
            conditioning: stack(|p| &p.conditioning, b),
        })
    }

    /// Conditioning vectors for many prompts; equal to calling
    /// [`WorldModel::condition`] on each, but batched through the backend.
    pub fn condition_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Conditioned>> {
        let encoded = self.encode(prompts)?;
        let outputs = self.forward(&encoded)?;
        Ok(encoded
            .iter()
            .zip(outputs.conditioning.outer_iter())
            .map(|(e, v)| Conditioned {
                tokens: e.ids.len(),
                total_tokens: e.total_tokens,
                vector: v.to_vec(),
            })
            .collect())
    }

    /// What the bridge makes of each text's *own* encoder latent,
    /// `bridge(encoder(text))`, skipping the transition. For a reply, this
    /// is the conditioning a perfect transition would predict from its
    /// context (the encoder's latent of the reply is what the transition is
    /// trained towards): eval-conditioning's oracle, an upper bound on what
    /// the channel can carry.
    pub fn encode_as_conditioning<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Conditioned>> {
        let encoded = self.encode(texts)?;
        let state = self.forward(&encoded)?.state;
        let bridged = self.backend.bridge(state.view())?;
        Ok(encoded
            .iter()
            .zip(bridged.outer_iter())
            .map(|(e, v)| Conditioned {
                tokens: e.ids.len(),
                total_tokens: e.total_tokens,
                vector: v.to_vec(),
            })
            .collect())
    }

    /// The conditioning vector for one prompt.
    pub fn condition(&self, prompt: &str) -> Result<Conditioned> {
        Ok(self.condition_batch(&[prompt])?.remove(0))
    }

    /// What `--ablate-conditioning` gives: the prompts are still tokenized
    /// (and rejected if empty) but the vectors are zeros of `bridge_dim`.
    pub fn ablated<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Conditioned>> {
        Ok(self
            .encode(prompts)?
            .into_iter()
            .map(|e| Conditioned {
                tokens: e.ids.len(),
                total_tokens: e.total_tokens,
                vector: vec![0.0; self.config.bridge_dim],
            })
            .collect())
    }
}

/// The backend `options.device` asks for, and why an automatic choice fell
/// back to the CPU.
fn load_backend(
    ckpt: &Checkpoint,
    config: &WorldConfig,
    options: &LoadOptions,
) -> Result<(Box<dyn WorldBackend>, Option<String>)> {
    let cpu = || -> Result<Box<dyn WorldBackend>> {
        let threads = options.threads.unwrap_or_else(default_threads);
        Ok(Box::new(cpu::CpuBackend::load(ckpt, config, threads)?))
    };
    match options.device {
        Device::Cpu => Ok((cpu()?, None)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Ok((
            Box::new(cuda::CudaBackend::load(ckpt, config, ordinal)?),
            None,
        )),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(WorldError::Cuda {
            message: device::NOT_BUILT.to_string(),
        }),
        #[cfg(feature = "cuda")]
        Device::Auto => match cuda::CudaBackend::load(ckpt, config, 0) {
            Ok(gpu) => Ok((Box::new(gpu), None)),
            // Only a GPU problem falls back; a faulty checkpoint is an error anywhere.
            Err(err @ WorldError::Cuda { .. }) => Ok((cpu()?, Some(err.to_string()))),
            Err(err) => Err(err),
        },
        #[cfg(not(feature = "cuda"))]
        Device::Auto => Ok((cpu()?, None)),
    }
}

/// Every core the process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
