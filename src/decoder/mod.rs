//! Text generation: the [`Decoder`] trait and its three backends.
//!
//! - [`llama`]: llama.cpp linked in-process (`llama-cpp-2`), the model loaded
//!   once and owned by a thread of its own;
//! - [`subprocess`]: the seed's backend, one `llama-completion` process per
//!   request;
//! - [`stub`]: a deterministic placeholder when no model is available.
//!
//! Every backend streams through the same sink, so the CLI and the server
//! print pieces the moment they exist, and a sink that answers
//! [`ControlFlow::Break`] cancels the generation.

pub mod config;
pub mod control;
pub mod discovery;
pub mod embeddings;
pub mod llama;
pub mod prompt;
pub mod stop;
pub mod stub;
pub mod subprocess;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use config::{BackendKind, CacheType, DecoderConfig, Sampling};
pub use control::{ControlError, ControlVector};
pub use embeddings::{Embeddings, EmbeddingsError};

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Where embedding rows go in a chat conversation: each occurrence in the
/// templated text is replaced by the next set of [`Prompt::Chat`]'s
/// embeddings. Placed after the template is applied, so the rows sit exactly
/// there whatever the template's syntax. Plain text to every tokenizer; a
/// conversation whose text holds more (or fewer) markers than it has sets of
/// rows is refused, so a user cannot move the rows by typing the marker.
pub const EMBEDDINGS_MARKER: &str = "<tofy:embeddings>";

/// One piece of a raw prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// Text, tokenized by the decoder; special-token text such as
    /// `<|im_end|>` becomes that token. The model's BOS token is added only
    /// when the prompt starts with text.
    Text(String),
    /// Token ids, as they are.
    Tokens(Vec<i32>),
    /// Embedding rows in the place of tokens.
    Embeddings(Embeddings),
}

/// What the model continues.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, formatted with the model's chat template; each
    /// [`EMBEDDINGS_MARKER`] in the formatted text becomes the next of
    /// `embeddings`.
    Chat {
        messages: Vec<ChatMessage>,
        embeddings: Vec<Embeddings>,
    },
    /// Segments continued as they are, with no template (`/v1/completions`,
    /// benchmarks, embedding-prefix experiments).
    Raw(Vec<Segment>),
}

impl Prompt {
    /// A conversation with no embedding rows.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::Chat {
            messages,
            embeddings: Vec::new(),
        }
    }

    /// Raw text, continued as is.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Raw(vec![Segment::Text(text.into())])
    }

    /// The text of the last user message (or the raw text).
    pub fn last_user_text(&self) -> String {
        match self {
            Self::Chat { messages, .. } => messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map_or_else(String::new, |m| m.content.clone()),
            Self::Raw(segments) => segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Text(text) => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Embedding rows in the prompt.
    pub fn embedding_rows(&self) -> usize {
        match self {
            Self::Chat { embeddings, .. } => embeddings.iter().map(Embeddings::n_rows).sum(),
            Self::Raw(segments) => segments
                .iter()
                .map(|s| match s {
                    Segment::Embeddings(e) => e.n_rows(),
                    _ => 0,
                })
                .sum(),
        }
    }

    /// The prompt as text, for backends that only take text: the plain
    /// chat layout or the raw text. `None` when it holds embedding rows or
    /// token ids.
    pub fn plain_text(&self) -> Option<String> {
        match self {
            Self::Chat {
                messages,
                embeddings,
            } if embeddings.is_empty() => Some(prompt::plain_layout(messages)),
            Self::Chat { .. } => None,
            Self::Raw(segments) => segments
                .iter()
                .map(|s| match s {
                    Segment::Text(text) => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// One generation: the prompt, how many tokens at most, how to sample and
/// where to stop.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// Upper bound on generated tokens; the context bounds it too.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (benchmarks, as llama-server's
    /// `ignore_eos`).
    pub ignore_eos: bool,
    /// Set by the caller to give up: the llama backend drops the request
    /// while it is queued or reading its prompt, not only when a piece
    /// cannot be delivered (the server sets it when the client leaves).
    pub cancel: Option<Arc<AtomicBool>>,
    /// A control vector for this request alone (llama backend only).
    pub control: Option<ControlVector>,
}

impl GenerateRequest {
    /// A chat request with no stop strings.
    pub fn chat(messages: Vec<ChatMessage>, max_new_tokens: usize, sampling: Sampling) -> Self {
        Self {
            prompt: Prompt::chat(messages),
            max_new_tokens,
            sampling,
            stop: Vec::new(),
            ignore_eos: false,
            cancel: None,
            control: None,
        }
    }
}

/// Why a generation ended (the OpenAI `finish_reason`, plus cancellation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// max_new_tokens or the end of the context.
    Length,
    /// The sink asked to stop.
    Cancelled,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose evaluation was reused from the previous request
    /// (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// From the call to the first piece handed to the sink (or to the end
    /// when nothing was generated).
    pub time_to_first_token: Duration,
    /// Prompt evaluation alone, where the backend can tell.
    pub prompt_time: Option<Duration>,
    pub total_time: Duration,
}

impl Generation {
    /// A generation cancelled before it started.
    pub fn cancelled() -> Self {
        Self {
            text: String::new(),
            finish_reason: FinishReason::Cancelled,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            time_to_first_token: Duration::ZERO,
            prompt_time: None,
            total_time: Duration::ZERO,
        }
    }
}

/// A teacher-forced scoring: how likely `continuation` is after `prompt`.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    pub prompt: Prompt,
    /// Text tokenized without BOS, special-token text read as such (so
    /// `"reply<|im_end|>"` scores the end-of-turn token too).
    pub continuation: String,
    pub cancel: Option<Arc<AtomicBool>>,
    /// A control vector for this scoring alone (llama backend only).
    pub control: Option<ControlVector>,
}

/// The log-probability of each continuation token given everything before
/// it, in f64 from the model's logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub tokens: Vec<i32>,
    pub logprobs: Vec<f64>,
    /// Tokens and embedding rows of the prompt alone.
    pub prompt_tokens: usize,
    /// Prompt positions reused from the sequence's cache.
    pub cached_tokens: usize,
}

impl Score {
    /// Mean negative log-likelihood per continuation token (NaN when empty).
    pub fn mean_nll(&self) -> f64 {
        -self.logprobs.iter().sum::<f64>() / self.logprobs.len() as f64
    }
}

/// The piece sink: gets each new piece of text, answers whether to go on.
pub type Sink<'a> = dyn FnMut(&str) -> ControlFlow<()> + 'a;

/// A generation a decoder has accepted: checked, and queued where the
/// backend queues. Streaming it waits for its turn, then hands each piece to
/// the sink; dropping it unstreamed cancels it.
pub trait Accepted {
    fn stream(self: Box<Self>, sink: &mut Sink<'_>) -> Result<Generation, DecoderError>;
}

/// An accepted generation that runs when streamed, for backends with no
/// queue of their own (subprocess, stub).
pub struct Deferred<F>(pub F);

impl<F> Accepted for Deferred<F>
where
    F: FnOnce(&mut Sink<'_>) -> Result<Generation, DecoderError>,
{
    fn stream(self: Box<Self>, sink: &mut Sink<'_>) -> Result<Generation, DecoderError> {
        (self.0)(sink)
    }
}

/// A text generator. Implementations own their native resources; `generate`
/// streams into `sink` and returns the whole result. Calls may come from
/// many threads at once: a backend runs them together (llama) or side by
/// side (subprocess, stub).
pub trait Decoder: Send + Sync {
    /// `llama`, `subprocess` or `stub`.
    fn backend(&self) -> BackendKind;
    /// The GGUF file in use, if any.
    fn model_path(&self) -> Option<&Path>;
    /// Context size in tokens, when the backend knows it.
    fn context_size(&self) -> Option<usize>;
    /// No prompt text longer than this many bytes can fit the context
    /// (where the backend knows the vocabulary: the context times the
    /// longest token's text), so a longer one is refused unread.
    fn prompt_byte_limit(&self) -> Option<usize> {
        None
    }
    /// Sequences being evaluated now, where the backend schedules them
    /// itself (the llama backend's slots); `None` where every call runs at
    /// once.
    fn active_sequences(&self) -> Option<usize> {
        None
    }
    /// Checks `request` and queues it: its prompt laid out (templated,
    /// tokenized) on the caller's thread and held to the context, so that
    /// what is wrong with a request is an error here, before it waits for
    /// a sequence. The returned handle streams it.
    fn submit<'d>(
        &'d self,
        request: &GenerateRequest,
    ) -> Result<Box<dyn Accepted + 'd>, DecoderError>;
    /// [`submit`](Self::submit), then stream into `sink`.
    fn generate(
        &self,
        request: &GenerateRequest,
        sink: &mut Sink<'_>,
    ) -> Result<Generation, DecoderError> {
        self.submit(request)?.stream(sink)
    }
    /// `Err(reason)` once the backend can no longer generate (its worker
    /// thread died); every later request would fail.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// Stops generating before the process exits: every queued and running
    /// request ends with [`DecoderError::ShuttingDown`], the step in
    /// progress is abandoned, and the native state is released, waiting at
    /// most `within`. An error means something is still running: the caller
    /// must then leave without running destructors (`crate::exit::now`),
    /// never race them against a live decode. Later requests are refused.
    fn shutdown(&self, _within: std::time::Duration) -> Result<(), DecoderError> {
        Ok(())
    }
    /// The width of an embedding row (llama.cpp's `n_embd_inp`), where
    /// the backend takes embedding rows.
    fn input_width(&self) -> Option<usize> {
        None
    }
    /// What a control vector must fit, `(n_embd, n_layer)`, where the
    /// backend applies control vectors.
    fn control_shape(&self) -> Option<(usize, usize)> {
        None
    }
    /// The model's tokens for `text`; `add_special` adds BOS where the
    /// model wants one and reads special-token text as such.
    fn tokenize(&self, _text: &str, _add_special: bool) -> Result<Vec<i32>, DecoderError> {
        Err(self.unsupported("tokenize"))
    }
    /// The text of `tokens` (special tokens written out).
    fn detokenize(&self, _tokens: &[i32]) -> Result<String, DecoderError> {
        Err(self.unsupported("detokenize"))
    }
    /// The text that ends an assistant turn (`<|im_end|>` for ChatML),
    /// where the backend knows the vocabulary.
    fn end_of_turn(&self) -> Option<String> {
        None
    }
    /// The prompt as the model reads it: runs of token ids and the
    /// embedding rows between them, in order (what `generate` and `score`
    /// evaluate), where the backend tokenizes.
    fn layout(&self, _prompt: &Prompt) -> Result<Vec<Segment>, DecoderError> {
        Err(self.unsupported("lay out a prompt"))
    }
    /// The tokens of a prompt with no embedding rows, as a generation would
    /// see them (the chat template applied to a chat prompt): its
    /// [`layout`](Self::layout), which must be one run of tokens.
    fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<i32>, DecoderError> {
        match self.layout(prompt)?.as_slice() {
            [] => Ok(Vec::new()),
            [Segment::Tokens(tokens)] => Ok(tokens.clone()),
            _ => Err(self.unsupported("list the tokens of a prompt with embedding rows")),
        }
    }
    /// Teacher-forced log-probabilities of a continuation.
    fn score(&self, _request: &ScoreRequest) -> Result<Score, DecoderError> {
        Err(self.unsupported("score a continuation"))
    }
    /// The error for what this backend cannot do.
    fn unsupported(&self, what: &'static str) -> DecoderError {
        DecoderError::Unsupported {
            backend: self.backend().name(),
            what,
        }
    }
}

/// Everything that can go wrong in a decoder, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error(
        "JEPA_DECODER_MODEL={0}: no such file; point it at a .gguf model or unset it to search ./models"
    )]
    ModelMissing(PathBuf),
    #[error(
        "{0} is a directory, not a .gguf file; point JEPA_DECODER_MODEL at the model file inside it"
    )]
    ModelIsDirectory(PathBuf),
    #[error(
        "{path}: llama.cpp could not load this model (not a GGUF file, truncated, or an architecture this llama.cpp does not know); check the file or download it again"
    )]
    ModelLoad { path: PathBuf },
    #[error(
        "llama.cpp could not create a context of {ctx} tokens for {path} (out of memory, or a backend without flash attention for a q8_0 cache?); reduce JEPA_DECODER_CTX, or try --cache-type f16"
    )]
    ContextCreate { path: PathBuf, ctx: u32 },
    #[error(
        "context length exceeded: the prompt is {prompt_tokens} tokens but the context holds {context} (JEPA_DECODER_CTX); shorten the prompt or raise JEPA_DECODER_CTX"
    )]
    ContextExceeded {
        prompt_tokens: usize,
        context: usize,
    },
    #[error("the prompt is empty after tokenization; send some text")]
    EmptyPrompt,
    #[error("the continuation to score is empty after tokenization; send some text")]
    EmptyContinuation,
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the chat template of {path} failed: {message}")]
    Template { path: PathBuf, message: String },
    #[error("llama.cpp failed to evaluate the batch: {0}")]
    Decode(String),
    #[error(
        "decoder binary '{bin}' could not be started: {source}; install or build llama.cpp's llama-completion, or set JEPA_DECODER_BIN to its full path"
    )]
    BinaryNotFound {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "decoder process '{bin}' failed ({status}): {stderr_tail}; run the command by hand to check the model path and flags"
    )]
    ProcessFailed {
        bin: String,
        status: String,
        stderr_tail: String,
    },
    #[error(
        "the subprocess backend needs a model: set JEPA_DECODER_MODEL or put a .gguf under ./models"
    )]
    NoModelForSubprocess,
    #[error("decoder I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the llama.cpp worker thread stopped unexpectedly")]
    WorkerGone,
    #[error("the decoder is shutting down; retry against a running server")]
    ShuttingDown,
    #[error("the model load was cancelled (the process is stopping)")]
    LoadCancelled,
    #[error(
        "{what} did not stop within {} s of being asked to",
        within.as_secs_f64()
    )]
    StopTimeout {
        what: &'static str,
        within: std::time::Duration,
    },
    #[error("{0}; restart the server")]
    WorkerDied(String),
    #[error("llama.cpp backend initialisation failed: {0}")]
    Backend(String),
    #[error(
        "the {backend} backend cannot {what}; use the llama backend (JEPA_DECODER_BACKEND=llama) with a GGUF model"
    )]
    Unsupported {
        backend: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Embeddings(#[from] EmbeddingsError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "the conversation holds {markers} embedding markers ({marker}) but {sets} sets of embedding rows; remove the marker text from the messages"
    )]
    Markers {
        markers: usize,
        sets: usize,
        marker: &'static str,
    },
    #[error("RPC: {0}")]
    Rpc(String),
    #[error("token id {token} is not in this model's vocabulary (0..{n_vocab})")]
    InvalidToken { token: i32, n_vocab: usize },
}

/// Opens the backend `config` selects: the llama.cpp or subprocess backend
/// when a model is found, the stub otherwise (or when asked for).
pub fn open(config: &DecoderConfig) -> Result<Box<dyn Decoder>, DecoderError> {
    let model = discovery::find_model(config.model.as_deref(), &config.search_root)?;
    match (config.backend, model) {
        (BackendKind::Stub, _) | (_, None) => Ok(Box::new(stub::StubDecoder)),
        (BackendKind::Llama, Some(model)) => {
            Ok(Box::new(llama::LlamaDecoder::load(&model, config)?))
        }
        (BackendKind::Subprocess, Some(model)) => {
            Ok(Box::new(subprocess::SubprocessDecoder::new(model, config)))
        }
    }
}

/// The seed's troubleshooting advice, printed when the stub answers.
pub const STUB_ADVICE: &str = "\
note: no decoder model was found, so the stub backend answered (its reply is a placeholder).
  To get real replies:
  - put a .gguf model under ./models (`make models` fetches SmolLM2-135M-Instruct), or
    set JEPA_DECODER_MODEL to a .gguf file;
  - for the subprocess backend, install or build llama.cpp's llama-completion, or set
    JEPA_DECODER_BIN to the binary's full path.
  `tofy doctor` shows what was found.";
