//! The in-process llama.cpp backend (`llama-cpp-2`).
//!
//! The model and its context live on a thread of their own: a
//! `LlamaContext` borrows the model and is not `Send`, and a long-lived
//! owner thread is also what lets the model load once and serve every
//! request. Callers talk to it over channels: a job goes in, pieces and
//! then the result come back, and a cancel flag is checked every token.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::config::PENALTY_LAST_N;
use super::stop::StopScanner;
use super::{
    BackendKind, Decoder, DecoderConfig, DecoderError, FinishReason, GenerateRequest, Generation,
    Prompt, Sampling, Sink, prompt,
};

/// llama.cpp's process-wide state: initialised once, never torn down.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

fn backend() -> Result<&'static LlamaBackend, DecoderError> {
    BACKEND
        .get_or_init(|| {
            let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            // llama.cpp logs every tensor it loads to stderr; keep the CLI's
            // output readable unless someone asks for the logs.
            if std::env::var_os("TOFY_LLAMA_LOG").is_none() {
                backend.void_logs();
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| DecoderError::Backend(e.clone()))
}

/// Whether this build of llama.cpp can offload layers to a GPU.
pub fn gpu_offload_supported() -> bool {
    backend().is_ok_and(LlamaBackend::supports_gpu_offload)
}

/// A generation handed to the worker thread.
struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
}

enum Event {
    Piece(String),
    Done(Result<Generation, DecoderError>),
}

/// llama.cpp in-process: one model, one context, owned by a worker thread.
pub struct LlamaDecoder {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    model_path: PathBuf,
    context_size: usize,
}

impl LlamaDecoder {
    /// Loads `path` on a new worker thread and waits until it is ready.
    pub fn load(path: &Path, config: &DecoderConfig) -> Result<Self, DecoderError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let model_path = path.to_path_buf();
        let (worker_path, worker_config) = (model_path.clone(), config.clone());
        let worker = std::thread::Builder::new()
            .name("tofy-llama".into())
            // llama.cpp's tokenizers may recurse deeply (std::regex) on long text.
            .stack_size(8 << 20)
            .spawn(move || run_worker(&worker_path, &worker_config, &ready_tx, &jobs_rx))?;
        match ready_rx.recv() {
            Ok(Ok(context_size)) => Ok(Self {
                jobs: Some(jobs_tx),
                worker: Some(worker),
                model_path,
                context_size,
            }),
            Ok(Err(err)) => {
                let _ = worker.join();
                Err(err)
            }
            Err(_) => {
                let _ = worker.join();
                Err(DecoderError::WorkerGone)
            }
        }
    }
}

impl Drop for LlamaDecoder {
    fn drop(&mut self) {
        // Closing the job channel ends the worker's loop; joining frees the
        // context and the model before the process goes on.
        self.jobs.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Decoder for LlamaDecoder {
    fn backend(&self) -> BackendKind {
        BackendKind::Llama
    }

    fn model_path(&self) -> Option<&Path> {
        Some(&self.model_path)
    }

    fn context_size(&self) -> Option<usize> {
        Some(self.context_size)
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut Sink<'_>,
    ) -> Result<Generation, DecoderError> {
        let (events_tx, events_rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            request: request.clone(),
            events: events_tx,
            cancel: Arc::clone(&cancel),
        };
        let jobs = self.jobs.as_ref().ok_or(DecoderError::WorkerGone)?;
        jobs.send(job).map_err(|_| DecoderError::WorkerGone)?;
        // What the sink accepted: after a cancel the worker may have produced
        // a few more pieces before it saw the flag, and those never count.
        let mut delivered = String::new();
        for event in events_rx {
            match event {
                Event::Piece(piece) => {
                    if cancel.load(Ordering::Relaxed) {
                        continue;
                    }
                    delivered.push_str(&piece);
                    if sink(&piece).is_break() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                Event::Done(result) => {
                    return result.map(|mut generation| {
                        if generation.finish_reason == FinishReason::Cancelled
                            || cancel.load(Ordering::Relaxed)
                        {
                            generation.finish_reason = FinishReason::Cancelled;
                            generation.text = delivered;
                        }
                        generation
                    });
                }
            }
        }
        Err(DecoderError::WorkerGone)
    }
}

/// The worker thread: load, report readiness, then serve jobs until the
/// channel closes.
fn run_worker(
    path: &Path,
    config: &DecoderConfig,
    ready: &mpsc::Sender<Result<usize, DecoderError>>,
    jobs: &mpsc::Receiver<Job>,
) {
    let loaded = match Loaded::open(path, config) {
        Ok(loaded) => loaded,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    let mut context = match loaded.context(config) {
        Ok(context) => context,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    if ready.send(Ok(loaded.context_size)).is_err() {
        return;
    }
    // Tokens whose keys and values sit in the context (sequence 0), so that a
    // prompt sharing a prefix with the last one (the same system message,
    // an agent resending its conversation) only evaluates what is new.
    let mut cached = Vec::new();
    for job in jobs {
        let result = loaded.generate(&mut context, &mut cached, &job);
        if result.is_err() {
            // A failed evaluation leaves the context's contents unknown.
            cached.clear();
        }
        let _ = job.events.send(Event::Done(result));
    }
}

/// A loaded model and what is read from it once.
struct Loaded {
    backend: &'static LlamaBackend,
    model: LlamaModel,
    path: PathBuf,
    template: Option<LlamaChatTemplate>,
    /// JEPA_DECODER_CTX. llama.cpp rounds its context up (to 256 tokens),
    /// but the user's number is the limit prompts are held to.
    context_size: usize,
}

impl Loaded {
    fn open(path: &Path, config: &DecoderConfig) -> Result<Self, DecoderError> {
        let backend = backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(config.ngl);
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|_| {
            DecoderError::ModelLoad {
                path: path.to_path_buf(),
            }
        })?;
        let template = model.chat_template(None).ok();
        Ok(Self {
            backend,
            model,
            path: path.to_path_buf(),
            template,
            context_size: config.ctx as usize,
        })
    }

    fn context(&self, config: &DecoderConfig) -> Result<LlamaContext<'_>, DecoderError> {
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(config.ctx))
            .with_n_batch(config.ctx.min(2048))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        self.model
            .new_context(self.backend, params)
            .map_err(|_| DecoderError::ContextCreate {
                path: self.path.clone(),
                ctx: config.ctx,
            })
    }

    /// The conversation through the GGUF's chat template, or the plain
    /// layout (and its stop strings) when it has none that llama.cpp knows;
    /// raw text as is.
    fn format(&self, prompt: &Prompt) -> Result<(String, Vec<String>), DecoderError> {
        let messages = match prompt {
            Prompt::Chat(messages) => messages,
            Prompt::Text(text) => return Ok((text.clone(), Vec::new())),
        };
        if let Some(template) = &self.template {
            let chat = messages
                .iter()
                .map(|m| LlamaChatMessage::new(m.role.as_str().into(), m.content.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| DecoderError::Template {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
            if let Ok(text) = self.model.apply_chat_template(template, &chat, true) {
                return Ok((text, Vec::new()));
            }
        }
        Ok((prompt::plain_layout(messages), prompt::plain_layout_stops()))
    }

    fn generate(
        &self,
        context: &mut LlamaContext<'_>,
        cached: &mut Vec<LlamaToken>,
        job: &Job,
    ) -> Result<Generation, DecoderError> {
        let start = Instant::now();
        let request = &job.request;
        let (text, mut stops) = self.format(&request.prompt)?;
        stops.extend(request.stop.iter().cloned());
        let vocab = self.model.vocab();
        let tokens = vocab.tokenize(text.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(DecoderError::EmptyPrompt);
        }
        let context_size = self.context_size;
        // At least one position must remain for the first generated token.
        if tokens.len() >= context_size {
            return Err(DecoderError::ContextExceeded {
                prompt_tokens: tokens.len(),
                context: context_size,
            });
        }

        // At least the last prompt token is evaluated again: its logits pick
        // the first new token.
        let reuse = reuse_prefix(context, cached, &tokens);
        cached.clear(); // rebuilt below once the context holds it again
        let mut batch = LlamaBatch::new(context.n_batch() as usize, 1);
        prefill(context, &mut batch, &tokens[reuse..], reuse)?;
        cached.extend_from_slice(&tokens);
        let prompt_time = start.elapsed();

        let mut sampler = sampler(&request.sampling, self.model.n_vocab());
        // As llama.cpp's own tools do: the repeat penalty window starts with
        // the end of the prompt, not empty. (`sample` accepts new tokens.)
        let window = tokens.len().saturating_sub(PENALTY_LAST_N as usize);
        sampler.accept_many(&tokens[window..]);
        let budget = request.max_new_tokens.min(context_size - tokens.len());
        // No BOM sniffing: the bytes are UTF-8 by definition.
        let mut utf8 = encoding_rs::UTF_8.new_decoder_without_bom_handling();
        let mut scanner = StopScanner::new(&stops);
        let mut out = Output::new(job, start);
        let mut bytes = Vec::new();
        let mut position = tokens.len();
        let mut logits_at = batch.n_tokens() - 1;
        let mut generated = 0;
        let finish = loop {
            if job.cancel.load(Ordering::Relaxed) {
                break FinishReason::Cancelled;
            }
            if generated == budget {
                break FinishReason::Length;
            }
            let token = sampler.sample(context, logits_at);
            if vocab.is_eog(token) && !request.ignore_eos {
                break FinishReason::Stop;
            }
            generated += 1;
            bytes.clear();
            vocab.token_to_piece_into(token, &mut bytes, false, None);
            let mut piece = String::with_capacity(
                utf8.max_utf8_buffer_length(bytes.len())
                    .unwrap_or(4 * bytes.len() + 16),
            );
            // A token may end inside a UTF-8 sequence: the decoder keeps the
            // partial bytes for the next token instead of emitting U+FFFD.
            let _ = utf8.decode_to_string(&bytes, &mut piece, false);
            let released = scanner.push(&piece);
            if !out.emit(&released.text) {
                break FinishReason::Cancelled;
            }
            if released.stopped {
                break FinishReason::Stop;
            }
            decode_one(context, &mut batch, token, position)?;
            cached.push(token);
            position += 1;
            logits_at = 0;
        };
        if finish != FinishReason::Cancelled {
            let mut rest = String::with_capacity(16);
            let _ = utf8.decode_to_string(&[], &mut rest, true);
            rest.push_str(&scanner.finish());
            out.emit(&rest);
        }
        Ok(Generation {
            text: out.text,
            finish_reason: finish,
            prompt_tokens: tokens.len(),
            cached_tokens: reuse,
            completion_tokens: generated,
            time_to_first_token: out.first.unwrap_or_else(|| start.elapsed()),
            prompt_time: Some(prompt_time),
            total_time: start.elapsed(),
        })
    }
}

/// The reply so far, and the channel its pieces go out on.
struct Output<'a> {
    job: &'a Job,
    start: Instant,
    text: String,
    first: Option<std::time::Duration>,
}

impl<'a> Output<'a> {
    fn new(job: &'a Job, start: Instant) -> Self {
        Self {
            job,
            start,
            text: String::new(),
            first: None,
        }
    }

    /// Sends a piece; false when the caller has gone.
    fn emit(&mut self, piece: &str) -> bool {
        if piece.is_empty() {
            return true;
        }
        self.first.get_or_insert_with(|| self.start.elapsed());
        self.text.push_str(piece);
        self.job
            .events
            .send(Event::Piece(piece.to_string()))
            .is_ok()
    }
}

/// How many leading prompt tokens can stay in the context: the common prefix
/// with what it holds, less one so the last prompt token is evaluated. The
/// rest of the sequence is removed; when llama.cpp cannot remove a part
/// (recurrent models), everything is.
fn reuse_prefix(
    context: &mut LlamaContext<'_>,
    cached: &[LlamaToken],
    tokens: &[LlamaToken],
) -> usize {
    let common = cached
        .iter()
        .zip(tokens)
        .take_while(|(a, b)| a == b)
        .count()
        .min(tokens.len() - 1);
    let position = u32::try_from(common).unwrap_or(u32::MAX);
    if common > 0 && context.clear_kv_cache_seq(Some(0), Some(position), None) == Ok(true) {
        return common;
    }
    context.clear_kv_cache();
    0
}

/// Evaluates `tokens` from position `start` in batches of n_batch; logits
/// only for the last token.
fn prefill(
    context: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch,
    tokens: &[LlamaToken],
    start: usize,
) -> Result<(), DecoderError> {
    let n_batch = context.n_batch() as usize;
    for (i, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (j, &token) in chunk.iter().enumerate() {
            let index = i * n_batch + j;
            let position = start + index;
            let last = index + 1 == tokens.len();
            batch
                .add(token, position as i32, &[0], last)
                .map_err(|e| DecoderError::Decode(e.to_string()))?;
        }
        context
            .decode(batch)
            .map_err(|e| DecoderError::Decode(e.to_string()))?;
    }
    Ok(())
}

fn decode_one(
    context: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch,
    token: LlamaToken,
    position: usize,
) -> Result<(), DecoderError> {
    batch.clear();
    batch
        .add(token, position as i32, &[0], true)
        .map_err(|e| DecoderError::Decode(e.to_string()))?;
    context
        .decode(batch)
        .map_err(|e| DecoderError::Decode(e.to_string()))
}

/// llama.cpp's sampler chain in its usual order: penalties, then top-k,
/// top-p, min-p, temperature and the random draw; greedy at temperature 0.
fn sampler(s: &Sampling, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    if s.repeat_penalty != 1.0 || s.frequency_penalty != 0.0 || s.presence_penalty != 0.0 {
        // llama.cpp caps the look-back at n_vocab, so it must be the real one.
        chain.push(LlamaSampler::penalties(
            n_vocab,
            PENALTY_LAST_N,
            s.repeat_penalty,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        chain.push(LlamaSampler::dist(s.seed.unwrap_or_else(random_seed)));
    }
    LlamaSampler::chain_simple(chain)
}

/// A seed for requests that did not fix one.
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}
