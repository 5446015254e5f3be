//! The in-process llama.cpp backend (`llama-cpp-2`), with continuous
//! batching of prompts that mix tokens and embedding rows.
//!
//! The model and its context live on a thread of their own: a
//! `LlamaContext` borrows the model and is not `Send`, and a long-lived
//! owner thread is also what lets the model load once and serve every
//! request. Callers talk to it over channels: a job goes in, pieces and then
//! the result come back, and a cancel flag is checked every step. The
//! caller's thread lays the job's prompt out (template, tokenizer, the
//! context check) before it is queued: the worker gets positions only.
//!
//! The context holds `parallel` sequences (slots). Each step of the worker's
//! loop builds one batch: the next token of every generating slot, then
//! prompt chunks of slots still reading their prompt, up to `n_batch`
//! tokens. A job that arrives joins at the next step; a job beyond the
//! slots waits in the worker's queue. Each slot keeps the tokens its cells
//! hold, so a prompt that shares a prefix with a slot's previous one (an
//! agent resending its conversation) only evaluates what is new. A prompt
//! position is a token or an embedding row ([`Prompt`] segments, or rows at
//! [`EMBEDDINGS_MARKER`] in a conversation); a cached row is reused only for
//! a row with the same bits. Where the architecture allows it, one
//! `llama_process` call takes tokens and rows together (`ffi::Evaluator`);
//! otherwise each step runs a token batch, then a row batch.
//!
//! Besides generating, a job can score: the teacher-forced log-probability
//! of each token of a continuation after a prompt, scheduled like any other
//! job (batched, prefix reuse included).
//!
//! Stopping ([`Decoder::shutdown`], and `Drop`) sets a flag that the worker
//! reads before each step and llama.cpp reads between graph nodes (its
//! abort callback): every job ends with [`DecoderError::ShuttingDown`], the
//! context is freed on the worker, and the thread ends. The process may
//! exit only after that: ggml's static destructors must never run beside a
//! live decode (they did, as a SIGSEGV at a drain timeout).

pub mod ffi;
#[cfg(feature = "cuda")]
pub mod modules;
pub mod rpc;
mod sample;

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::control::same_control;
use super::stop::StopScanner;
use super::{
    Accepted, BackendKind, CacheType, ControlVector, Decoder, DecoderConfig, DecoderError,
    EMBEDDINGS_MARKER, Embeddings, FinishReason, GenerateRequest, Generation, Prompt, Role, Score,
    ScoreRequest, Segment, Sink, prompt,
};
use ffi::{BatchError, Evaluator};
use sample::Picker;

/// llama.cpp's process-wide state: initialised once, never torn down.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// llama.cpp's backend, initialised on first use (it can be initialised
/// only once per process: code that loads models itself takes it here).
pub fn backend() -> Result<&'static LlamaBackend, DecoderError> {
    BACKEND
        .get_or_init(|| {
            // llama.cpp logs every tensor it loads to stderr; keep the CLI's
            // output readable unless someone asks for the logs.
            if std::env::var_os("TOFY_LLAMA_LOG").is_none() {
                silence_logs();
            }
            // The `cuda` build's backends are modules: none is there until loaded.
            #[cfg(feature = "cuda")]
            modules::load().map_err(|e| e.to_string())?;
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| DecoderError::Backend(e.clone()))
}

/// Drops llama.cpp's (and ggml's) log lines from here on. Set before the
/// backend modules load, which log each file they open.
fn silence_logs() {
    unsafe extern "C" fn drop_line(
        _level: llama_cpp_sys_2::ggml_log_level,
        _text: *const std::ffi::c_char,
        _user_data: *mut std::ffi::c_void,
    ) {
    }
    // SAFETY: installs a callback that ignores its arguments.
    unsafe { llama_cpp_sys_2::llama_log_set(Some(drop_line), std::ptr::null_mut()) };
}

/// Whether `--ngl` layers have somewhere to go: a GPU, or a registered RPC
/// server. (llama.cpp's own `supports_gpu_offload` says yes whenever the RPC
/// backend is compiled in, servers or not.)
pub fn gpu_offload_supported() -> bool {
    rpc::offload_device_present()
}

/// A generation or a scoring handed to the worker thread.
struct Job {
    work: Work,
    events: mpsc::Sender<Event>,
    cancel: Arc<AtomicBool>,
    /// When the caller asked: time to first token includes the queue.
    start: Instant,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn finish(&self, result: Result<Generation, DecoderError>) {
        let _ = self.events.send(Event::Done(result));
    }

    /// Ends the job with `err` (a cancelled generation ends as an empty,
    /// cancelled generation: that is not an error to its caller).
    fn fail(&self, err: DecoderError) {
        let event = match (&self.work, err) {
            (Work::Generate(_), DecoderError::Cancelled) => {
                Event::Done(Ok(Generation::cancelled()))
            }
            (Work::Generate(_), err) => Event::Done(Err(err)),
            (Work::Score(_), err) => Event::Scored(Err(err)),
        };
        let _ = self.events.send(event);
    }
}

enum Work {
    Generate(GenerateRequest),
    Score(ScoreRequest),
}

impl Work {
    /// The text a fault-injection point looks at.
    fn text(&self) -> String {
        match self {
            Self::Generate(r) => r.prompt.last_user_text(),
            Self::Score(r) => r.prompt.last_user_text(),
        }
    }
}

/// A job on its way to the worker, its prompt already laid out by the
/// caller's thread: templating and tokenizing never hold up the batch.
struct Queued {
    job: Job,
    prepared: Prepared,
}

enum Event {
    Piece(String),
    Done(Result<Generation, DecoderError>),
    Scored(Result<Score, DecoderError>),
}

/// llama.cpp in-process: one model, one context of `parallel` sequences,
/// owned by a worker thread.
pub struct LlamaDecoder {
    /// Taken (closing the channel, which wakes an idle worker) on shutdown.
    jobs: Mutex<Option<mpsc::Sender<Queued>>>,
    worker: Option<JoinHandle<()>>,
    /// Set to stop the worker: read before each step and by llama.cpp's
    /// abort callback during one.
    stop: Arc<AtomicBool>,
    /// The model itself (its path and context size with it), shared with
    /// the worker: tokenizing needs no slot.
    model: Arc<Loaded>,
    /// Slots generating or reading a prompt, as the worker last saw them.
    active: Arc<AtomicUsize>,
    /// Why the worker thread died, once it has.
    dead: Arc<OnceLock<String>>,
}

impl LlamaDecoder {
    /// Loads `path` on a new worker thread and waits until it is ready.
    pub fn load(path: &Path, config: &DecoderConfig) -> Result<Self, DecoderError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(OnceLock::new());
        let stop = Arc::new(AtomicBool::new(false));
        // The model is `Send + Sync`; only the context must stay on the worker.
        let model = Arc::new(Loaded::open(path, config)?);
        let (worker_model, worker_config, worker_active, worker_dead, worker_stop) = (
            Arc::clone(&model),
            config.clone(),
            Arc::clone(&active),
            Arc::clone(&dead),
            Arc::clone(&stop),
        );
        let worker = std::thread::Builder::new()
            .name("tofy-llama".into())
            // llama.cpp's tokenizers may recurse deeply (std::regex) on long text.
            .stack_size(8 << 20)
            .spawn(move || {
                run_worker(
                    &worker_model,
                    &worker_config,
                    &ready_tx,
                    &jobs_rx,
                    &worker_active,
                    &worker_dead,
                    &worker_stop,
                );
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                jobs: Mutex::new(Some(jobs_tx)),
                worker: Some(worker),
                stop,
                model,
                active,
                dead,
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

impl LlamaDecoder {
    /// Asks the worker to stop: its jobs end, its context is freed.
    fn ask_to_stop(&self) {
        self.stop.store(true, Ordering::Release);
        // Closing the channel wakes a worker that sleeps waiting for a job.
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

impl Drop for LlamaDecoder {
    fn drop(&mut self) {
        // No job can be running (a stream borrows the decoder): joining
        // frees the context on its thread before the model is freed here.
        self.ask_to_stop();
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
        Some(&self.model.path)
    }

    fn context_size(&self) -> Option<usize> {
        Some(self.model.context_size)
    }

    fn active_sequences(&self) -> Option<usize> {
        Some(self.active.load(Ordering::Relaxed))
    }

    fn health(&self) -> Result<(), String> {
        match self.dead.get() {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    fn shutdown(&self, within: Duration) -> Result<(), DecoderError> {
        self.ask_to_stop();
        // Polled, not joined: a worker stuck in llama.cpp must not hang the
        // process on its way out (the caller then leaves with `_exit`).
        let stopped = self
            .worker
            .as_ref()
            .is_none_or(|w| crate::exit::within(within, || w.is_finished()));
        if stopped {
            Ok(())
        } else {
            Err(DecoderError::StopTimeout {
                what: "the llama.cpp worker thread",
                within,
            })
        }
    }

    fn prompt_byte_limit(&self) -> Option<usize> {
        Some(
            self.model
                .context_size
                .saturating_mul(self.model.longest_piece),
        )
    }

    fn control_shape(&self) -> Option<(usize, usize)> {
        Some((self.model.n_embd, self.model.n_layer))
    }

    fn input_width(&self) -> Option<usize> {
        Some(self.model.width)
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<i32>, DecoderError> {
        Ok(self
            .model
            .tokenize(text, add_special)
            .into_iter()
            .map(|t| t.0)
            .collect())
    }

    fn detokenize(&self, tokens: &[i32]) -> Result<String, DecoderError> {
        let vocab = self.model.model.vocab();
        let mut bytes = Vec::new();
        for &token in tokens {
            self.model.check_token(token)?;
            vocab.token_to_piece_into(LlamaToken(token), &mut bytes, true, None);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn end_of_turn(&self) -> Option<String> {
        // What the chat template writes after an assistant's reply (the
        // GGUF's EOT id is not always the template's: SmolLM2 names
        // <|endoftext|> but ends turns with <|im_end|>).
        const REPLY: &str = "tofy-reply";
        if let Some(template) = &self.model.template {
            let chat = [("user", "hi"), ("assistant", REPLY)]
                .map(|(role, text)| LlamaChatMessage::new(role.into(), text.into()));
            if let Ok(chat) = chat.into_iter().collect::<Result<Vec<_>, _>>()
                && let Ok(text) = self.model.model.apply_chat_template(template, &chat, false)
                && let Some((_, after)) = text.rsplit_once(REPLY)
                && !after.trim_end().is_empty()
            {
                return Some(after.trim_end().to_string());
            }
        }
        let eos = self.model.model.vocab().eos();
        (eos.0 >= 0).then(|| self.detokenize(&[eos.0]).ok())?
    }

    fn layout(&self, prompt: &Prompt) -> Result<Vec<Segment>, DecoderError> {
        let (items, _) = self.model.items(prompt)?;
        let mut segments: Vec<Segment> = Vec::new();
        let mut rows: Vec<f32> = Vec::new();
        let flush_rows = |rows: &mut Vec<f32>, segments: &mut Vec<Segment>| {
            if !rows.is_empty() {
                let e = Embeddings::new(std::mem::take(rows), self.model.width)
                    .expect("rows already checked");
                segments.push(Segment::Embeddings(e));
            }
        };
        for item in items {
            match item {
                Item::Token(token) => {
                    flush_rows(&mut rows, &mut segments);
                    match segments.last_mut() {
                        Some(Segment::Tokens(ids)) => ids.push(token.0),
                        _ => segments.push(Segment::Tokens(vec![token.0])),
                    }
                }
                Item::Row(e, r) => rows.extend_from_slice(e.row(r)),
            }
        }
        flush_rows(&mut rows, &mut segments);
        Ok(segments)
    }

    fn score(&self, request: &ScoreRequest) -> Result<Score, DecoderError> {
        let (events_rx, _) = self.enqueue(Work::Score(request.clone()), request.cancel.clone())?;
        for event in events_rx {
            if let Event::Scored(result) = event {
                return result;
            }
        }
        Err(worker_gone(&self.dead))
    }

    fn submit<'d>(
        &'d self,
        request: &GenerateRequest,
    ) -> Result<Box<dyn Accepted + 'd>, DecoderError> {
        let (events, cancel) =
            self.enqueue(Work::Generate(request.clone()), request.cancel.clone())?;
        Ok(Box::new(Streaming {
            events,
            cancel,
            dead: Arc::clone(&self.dead),
            done: false,
        }))
    }
}

/// A generation queued on the worker.
struct Streaming {
    events: mpsc::Receiver<Event>,
    cancel: Arc<AtomicBool>,
    dead: Arc<OnceLock<String>>,
    /// Whether its result came back.
    done: bool,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // Dropped before its end (unstreamed, or a panicking sink): the
        // worker gives the job up at its next step.
        if !self.done {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

impl Accepted for Streaming {
    fn stream(mut self: Box<Self>, sink: &mut Sink<'_>) -> Result<Generation, DecoderError> {
        let cancel = Arc::clone(&self.cancel);
        // What the sink accepted: after a cancel the worker may have produced
        // a few more pieces before it saw the flag, and those never count.
        let mut delivered = String::new();
        while let Ok(event) = self.events.recv() {
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
                    self.done = true;
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
                Event::Scored(_) => unreachable!("a scoring's event for a generation"),
            }
        }
        Err(worker_gone(&self.dead))
    }
}

/// The error for a job whose channel closed with no result: the worker is
/// unwinding from a panic, and sets its reason the moment it has.
fn worker_gone(dead: &OnceLock<String>) -> DecoderError {
    let deadline = Instant::now() + Duration::from_secs(5);
    while dead.get().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    dead.get().map_or(DecoderError::WorkerGone, |reason| {
        DecoderError::WorkerDied(reason.clone())
    })
}

impl LlamaDecoder {
    /// Whether each step evaluates tokens and embedding rows in separate
    /// batches (architectures that refuse the mix, or
    /// `DecoderConfig::split_mixed_batches`); the scheduler's passes follow
    /// this.
    pub fn splits_mixed_batches(&self) -> bool {
        !self.model.mixed_batches
    }

    /// A reader of the mean residual stream after `layers` (its own
    /// context: up to `max_prompts` prompts of `max_tokens` in all per
    /// pass), on this model.
    pub fn residual_reader(
        &self,
        layers: std::ops::RangeInclusive<usize>,
        max_tokens: u32,
        max_prompts: u32,
        threads: usize,
    ) -> Result<ffi::ResidualReader<'_>, ffi::ResidualError> {
        ffi::ResidualReader::new(
            self.model.backend,
            &self.model.model,
            layers,
            max_tokens,
            max_prompts,
            i32::try_from(threads.max(1)).unwrap_or(i32::MAX),
        )
    }

    /// Lays out `work`'s prompt here, on the caller's thread, and queues
    /// it on the worker; its events come back on the receiver.
    fn enqueue(
        &self,
        work: Work,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<(mpsc::Receiver<Event>, Arc<AtomicBool>), DecoderError> {
        if let Some(reason) = self.dead.get() {
            return Err(DecoderError::WorkerDied(reason.clone()));
        }
        if self.stop.load(Ordering::Acquire) {
            return Err(DecoderError::ShuttingDown);
        }
        let prepared = self.model.prepare(&work)?;
        let (events_tx, events_rx) = mpsc::channel();
        let cancel = cancel.unwrap_or_default();
        let job = Job {
            work,
            events: events_tx,
            cancel: Arc::clone(&cancel),
            start: Instant::now(),
        };
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        // No sender: shutdown took it. A closed channel without a stop: the
        // worker is gone (its panic sets `dead` for the stream to report).
        let sent = match jobs.as_ref() {
            Some(jobs) => jobs.send(Queued { job, prepared }).is_ok(),
            None => return Err(DecoderError::ShuttingDown),
        };
        match (sent, self.stop.load(Ordering::Acquire)) {
            (true, _) => Ok((events_rx, cancel)),
            (false, true) => Err(DecoderError::ShuttingDown),
            (false, false) => Err(DecoderError::WorkerGone),
        }
    }
}

/// The worker thread: create the context, report readiness, then schedule
/// jobs until asked to stop (or the channel closes).
fn run_worker(
    loaded: &Loaded,
    config: &DecoderConfig,
    ready: &mpsc::Sender<Result<(), DecoderError>>,
    jobs: &mpsc::Receiver<Queued>,
    active: &AtomicUsize,
    dead: &OnceLock<String>,
    stop: &AtomicBool,
) {
    let context = match loaded.context(config) {
        Ok(context) => context,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    // A panic here leaves the context in an unknown state mid-step: the
    // worker stops for good rather than serve from it. Unwinding drops
    // every job it held (their callers see the worker gone), and the
    // reason is kept for `Decoder::health`.
    let mut scheduler = Scheduler::new(loaded, context, config.parallel, active, stop);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scheduler.run(jobs)));
    if let Err(payload) = run {
        // The reason first, then the jobs: a caller woken by its job's end
        // finds the decoder already unhealthy.
        let _ = dead.set(format!(
            "the llama.cpp worker thread panicked: {}",
            crate::fault::panic_message(payload.as_ref())
        ));
        active.store(0, Ordering::Relaxed);
    }
    // The context is freed here, on its own thread, before the thread ends
    // (and so before `shutdown` reports the worker stopped).
    drop(scheduler);
}

/// A loaded model and what is read from it once.
struct Loaded {
    backend: &'static LlamaBackend,
    model: LlamaModel,
    path: PathBuf,
    template: Option<LlamaChatTemplate>,
    /// JEPA_DECODER_CTX, per sequence. llama.cpp rounds its context up (to
    /// 256 tokens), but the user's number is the limit prompts are held to.
    context_size: usize,
    /// The width of an embedding row (`n_embd_inp`).
    width: usize,
    /// Hidden size and layer count, which a control vector must fit.
    n_embd: usize,
    n_layer: usize,
    n_vocab: usize,
    /// The most bytes one token stands for: a prompt longer than
    /// `context_size` of these cannot fit, whatever its tokens.
    longest_piece: usize,
    /// Whether one batch may mix tokens and embedding rows (false for the
    /// architectures in `ffi::NO_MIXED_BATCH_ARCHS`, or when the config
    /// asks to split them).
    mixed_batches: bool,
}

impl Loaded {
    fn open(path: &Path, config: &DecoderConfig) -> Result<Self, DecoderError> {
        let backend = backend()?;
        rpc::add_servers(&config.rpc)?;
        let mut params = LlamaModelParams::default().with_n_gpu_layers(config.ngl);
        let cancelled = || {
            config
                .cancel_load
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Acquire))
        };
        if let Some(cancel) = config.cancel_load.clone() {
            // llama.cpp reports its progress as it reads the tensors; a
            // `false` back makes the load give up and free what it read.
            let mut first = true;
            params = params.with_progress_callback(move |_| {
                if std::mem::take(&mut first) {
                    crate::fault::slow_load(&cancel);
                }
                !cancel.load(Ordering::Acquire)
            });
        }
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|_| {
            if cancelled() {
                DecoderError::LoadCancelled
            } else {
                DecoderError::ModelLoad {
                    path: path.to_path_buf(),
                }
            }
        })?;
        if cancelled() {
            return Err(DecoderError::LoadCancelled);
        }
        let template = model.chat_template(None).ok();
        let arch = ffi::architecture(&model);
        let mixed_batches =
            !ffi::NO_MIXED_BATCH_ARCHS.contains(&arch.as_str()) && !config.split_mixed_batches;
        let longest_piece = longest_piece(&model);
        Ok(Self {
            backend,
            longest_piece,
            width: ffi::input_width(&model),
            n_embd: usize::try_from(model.n_embd()).unwrap_or(0),
            n_layer: model.n_layer() as usize,
            n_vocab: usize::try_from(model.n_vocab()).unwrap_or(0),
            mixed_batches,
            model,
            path: path.to_path_buf(),
            template,
            context_size: config.ctx as usize,
        })
    }

    /// One context for all slots: `ctx` cells per sequence, each sequence in
    /// a stream of its own (llama.cpp's default, as `llama-server -np N`).
    fn context(&self, config: &DecoderConfig) -> Result<LlamaContext<'_>, DecoderError> {
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(i32::MAX);
        let parallel = config.parallel.max(1) as u32;
        let create_error = || DecoderError::ContextCreate {
            path: self.path.clone(),
            ctx: config.ctx,
        };
        let total = config.ctx.checked_mul(parallel).ok_or_else(create_error)?;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(total))
            .with_n_seq_max(parallel)
            .with_n_batch(config.ctx.min(2048).max(parallel))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let params = match config.cache_type {
            // Flash attention with 8-bit keys and values. ggml's CPU kernel
            // has two faster paths that round a row differently depending
            // on what shares its batch (a tiled one for >= 64 query rows of
            // a sequence, a split-KV one for a lone token over >= 512
            // cells); both take only f16/f32 caches, so a q8_0 cache keeps
            // every row on the row-by-row path and replies batch-invariant.
            CacheType::Q8_0 => params
                .with_type_k(KvCacheType::Q8_0)
                .with_type_v(KvCacheType::Q8_0)
                .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED),
            // An f16 cache would reach those paths: attention runs as plain
            // matrix products instead.
            CacheType::F16 => params
                .with_type_k(KvCacheType::F16)
                .with_type_v(KvCacheType::F16)
                .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED),
        };
        self.model
            .new_context(self.backend, params)
            .map_err(|_| create_error())
    }

    /// The conversation through the GGUF's chat template, or the plain
    /// layout (and its stop strings) when it has none that llama.cpp knows.
    fn format(
        &self,
        messages: &[super::ChatMessage],
    ) -> Result<(String, Vec<String>), DecoderError> {
        if let Some(template) = &self.template {
            let chat = messages
                .iter()
                .map(|m| {
                    // Few templates know a tool role; a tool result is read
                    // as the user's turn (the caller wraps it to say so).
                    let role = match m.role {
                        Role::Tool => Role::User,
                        other => other,
                    };
                    LlamaChatMessage::new(role.as_str().into(), m.content.clone())
                })
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

    /// `text` as tokens; `add_special` adds BOS where the model wants one.
    /// Special-token text is always read as the token.
    fn tokenize(&self, text: &str, add_special: bool) -> Vec<LlamaToken> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
    }

    fn check_token(&self, token: i32) -> Result<LlamaToken, DecoderError> {
        if usize::try_from(token).is_ok_and(|t| t < self.n_vocab) {
            Ok(LlamaToken(token))
        } else {
            Err(DecoderError::InvalidToken {
                token,
                n_vocab: self.n_vocab,
            })
        }
    }

    /// The prompt as positions, and its stop strings.
    fn items(&self, prompt: &Prompt) -> Result<(Vec<Item>, Vec<String>), DecoderError> {
        let mut items = Vec::new();
        let rows = |items: &mut Vec<Item>, e: &Embeddings| -> Result<(), DecoderError> {
            e.check_width(self.width)?;
            items.extend((0..e.n_rows()).map(|r| Item::Row(e.clone(), r)));
            Ok(())
        };
        let tokens = |items: &mut Vec<Item>, text: &str, first: bool| {
            items.extend(self.tokenize(text, first).into_iter().map(Item::Token));
        };
        match prompt {
            Prompt::Chat {
                messages,
                embeddings,
            } => {
                let (text, stops) = self.format(messages)?;
                if embeddings.is_empty() {
                    tokens(&mut items, &text, true);
                } else {
                    let markers = text.matches(EMBEDDINGS_MARKER).count();
                    if markers != embeddings.len() {
                        return Err(DecoderError::Markers {
                            markers,
                            sets: embeddings.len(),
                            marker: EMBEDDINGS_MARKER,
                        });
                    }
                    for (i, part) in text.split(EMBEDDINGS_MARKER).enumerate() {
                        if i > 0 {
                            rows(&mut items, &embeddings[i - 1])?;
                        }
                        tokens(&mut items, part, i == 0);
                    }
                }
                Ok((items, stops))
            }
            Prompt::Raw(segments) => {
                for (i, segment) in segments.iter().enumerate() {
                    match segment {
                        Segment::Text(text) => tokens(&mut items, text, i == 0),
                        Segment::Tokens(ids) => {
                            for &id in ids {
                                items.push(Item::Token(self.check_token(id)?));
                            }
                        }
                        Segment::Embeddings(e) => rows(&mut items, e)?,
                    }
                }
                Ok((items, Vec::new()))
            }
        }
    }

    /// A job's positions and stop strings, or why it cannot run.
    fn prepare(&self, work: &Work) -> Result<Prepared, DecoderError> {
        let control = match work {
            Work::Generate(request) => request.control.clone(),
            Work::Score(request) => request.control.clone(),
        };
        if let Some(control) = &control {
            control.check(self.n_embd, self.n_layer)?;
        }
        match work {
            Work::Generate(request) => {
                let (items, mut stops) = self.items(&request.prompt)?;
                stops.extend(request.stop.iter().cloned());
                if items.is_empty() {
                    return Err(DecoderError::EmptyPrompt);
                }
                // At least one position must remain for the first generated token.
                if items.len() >= self.context_size {
                    return Err(DecoderError::ContextExceeded {
                        prompt_tokens: items.len(),
                        context: self.context_size,
                    });
                }
                Ok(Prepared {
                    first_logits: items.len() - 1,
                    items,
                    stops,
                    continuation: None,
                    control,
                })
            }
            Work::Score(request) => {
                let (mut items, _) = self.items(&request.prompt)?;
                if items.is_empty() {
                    return Err(DecoderError::EmptyPrompt);
                }
                let from = items.len();
                items.extend(
                    self.tokenize(&request.continuation, false)
                        .into_iter()
                        .map(Item::Token),
                );
                if items.len() == from {
                    return Err(DecoderError::EmptyContinuation);
                }
                if items.len() > self.context_size {
                    return Err(DecoderError::ContextExceeded {
                        prompt_tokens: items.len(),
                        context: self.context_size,
                    });
                }
                Ok(Prepared {
                    first_logits: from - 1,
                    items,
                    stops: Vec::new(),
                    continuation: Some(from),
                    control,
                })
            }
        }
    }
}

/// One position of a prompt: a token, or row `index` of a set of embedding
/// rows.
#[derive(Clone)]
enum Item {
    Token(LlamaToken),
    Row(Embeddings, usize),
}

impl Item {
    /// Whether the cell this item wrote can stand for `other`: the same
    /// token, or a row with the very same bits.
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Token(a), Self::Token(b)) => a == b,
            (Self::Row(a, i), Self::Row(b, j)) => a.same_row(*i, b, *j),
            _ => false,
        }
    }

    fn is_row(&self) -> bool {
        matches!(self, Self::Row(..))
    }
}

/// One sequence of the context.
struct Slot {
    seq: i32,
    /// What this sequence's cells hold, from position 0.
    cached: Vec<Item>,
    /// The control vector those cells were computed under: a cell is only
    /// the same item under the same vector.
    cached_control: Option<ControlVector>,
    /// When it last took a job: the least recently used slot is reused first.
    used: u64,
    run: Option<Run>,
}

/// A job in a slot: where it is in its prompt, and what it makes of it.
struct Run {
    job: Job,
    start: Instant,
    prompt: Vec<Item>,
    /// Prompt items kept from the slot's previous contents.
    reused: usize,
    /// Prompt items sent to the context so far (from `reused`).
    fed: usize,
    prompt_time: Option<Duration>,
    /// This run's control vector: its rows are evaluated with it set.
    control: Option<ControlVector>,
    task: Task,
}

enum Task {
    Generate(Box<Generating>),
    Score(Scoring),
}

/// A generation's state past its prompt.
struct Generating {
    picker: Picker,
    /// max_new_tokens, bounded by the room left in the sequence.
    budget: usize,
    generated: usize,
    utf8: encoding_rs::Decoder,
    scanner: StopScanner,
    text: String,
    first: Option<Duration>,
    /// A sampled token to evaluate at the next step.
    next: Option<LlamaToken>,
    /// Where this run's logits sit in the batch just evaluated.
    logits_at: Option<i32>,
}

/// A scoring's state: the continuation starts at prompt item `from`.
struct Scoring {
    from: usize,
    logprobs: Vec<f64>,
    /// (batch index, prompt index of the token its logits predict) for the
    /// batch just evaluated.
    pending: Vec<(i32, usize)>,
}

impl Run {
    /// Whether prompt item `i` needs its logits: the last prompt item of a
    /// generation, every item before a continuation token of a scoring.
    fn wants_logits(&self, i: usize) -> bool {
        match &self.task {
            Task::Generate(_) => i + 1 == self.prompt.len(),
            Task::Score(s) => i + 1 >= s.from && i + 1 < self.prompt.len(),
        }
    }

    /// Notes that prompt item `i` went into the batch at `idx`.
    fn fed_at(&mut self, i: usize, idx: i32) {
        if !self.wants_logits(i) {
            return;
        }
        match &mut self.task {
            Task::Generate(g) => g.logits_at = Some(idx),
            Task::Score(s) => s.pending.push((idx, i + 1)),
        }
    }

    fn prompt_done(&self) -> bool {
        self.fed == self.prompt.len()
    }

    fn prompt_tokens(&self) -> usize {
        match &self.task {
            Task::Generate(_) => self.prompt.len(),
            Task::Score(s) => s.from,
        }
    }

    /// Reports the result (a generation flushes what its UTF-8 decoder and
    /// stop scanner still hold, unless cancelled).
    fn finish(self, finish_reason: FinishReason) {
        let total_time = self.start.elapsed();
        let prompt_tokens = self.prompt_tokens();
        match self.task {
            Task::Generate(mut g) => {
                if finish_reason != FinishReason::Cancelled {
                    let mut rest = String::with_capacity(16);
                    let _ = g.utf8.decode_to_string(&[], &mut rest, true);
                    rest.push_str(&g.scanner.finish());
                    g.emit(&self.job, self.start, &rest);
                }
                self.job.finish(Ok(Generation {
                    text: std::mem::take(&mut g.text),
                    finish_reason,
                    prompt_tokens,
                    cached_tokens: self.reused,
                    completion_tokens: g.generated,
                    time_to_first_token: g.first.unwrap_or(total_time),
                    prompt_time: self.prompt_time,
                    total_time,
                }));
            }
            Task::Score(_) if finish_reason == FinishReason::Cancelled => {
                self.job.fail(DecoderError::Cancelled);
            }
            Task::Score(s) => {
                let tokens = self.prompt[s.from..]
                    .iter()
                    .map(|item| match item {
                        Item::Token(t) => t.0,
                        Item::Row(..) => unreachable!("continuations are tokens"),
                    })
                    .collect();
                let _ = self.job.events.send(Event::Scored(Ok(Score {
                    tokens,
                    logprobs: s.logprobs,
                    prompt_tokens,
                    cached_tokens: self.reused,
                })));
            }
        }
    }
}

impl Generating {
    /// Sends a piece; false when the caller has gone.
    fn emit(&mut self, job: &Job, start: Instant, piece: &str) -> bool {
        if piece.is_empty() {
            return true;
        }
        self.first.get_or_insert_with(|| start.elapsed());
        self.text.push_str(piece);
        job.events.send(Event::Piece(piece.to_string())).is_ok()
    }
}

/// Which rows one `llama_process` call takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Tokens and embedding rows together.
    Mixed,
    Tokens,
    Rows,
}

impl Pass {
    fn takes(self, item: &Item) -> bool {
        match self {
            Self::Mixed => true,
            Self::Tokens => !item.is_row(),
            Self::Rows => item.is_row(),
        }
    }
}

/// The continuous-batching loop over the slots of one context.
struct Scheduler<'m> {
    loaded: &'m Loaded,
    eval: Evaluator<'m>,
    slots: Vec<Slot>,
    queue: VecDeque<Queued>,
    /// One pass per step, or tokens then rows where the architecture cannot
    /// mix them.
    passes: &'static [Pass],
    /// The control vector set on the context now.
    control: Option<ControlVector>,
    clock: u64,
    /// Runs in slots, published for metrics. Lowered before a run reports
    /// its end, so a caller that has its result never sees it counted.
    active: &'m AtomicUsize,
    /// The decoder's stop flag (also llama.cpp's abort callback's).
    stop: &'m AtomicBool,
}

impl<'m> Scheduler<'m> {
    fn new(
        loaded: &'m Loaded,
        context: LlamaContext<'m>,
        parallel: usize,
        active: &'m AtomicUsize,
        stop: &'m AtomicBool,
    ) -> Self {
        let slots = (0..parallel.max(1))
            .map(|seq| Slot {
                seq: seq as i32,
                cached: Vec::new(),
                cached_control: None,
                used: 0,
                run: None,
            })
            .collect();
        let passes: &'static [Pass] = if loaded.mixed_batches {
            &[Pass::Mixed]
        } else {
            &[Pass::Tokens, Pass::Rows]
        };
        let mut eval = Evaluator::new(context);
        eval.abort_when(stop);
        Self {
            loaded,
            eval,
            slots,
            queue: VecDeque::new(),
            passes,
            control: None,
            clock: 0,
            active,
            stop,
        }
    }

    fn run(&mut self, jobs: &mpsc::Receiver<Queued>) {
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.queue.extend(jobs.try_iter());
                self.abandon();
                return;
            }
            let busy = self.slots.iter().any(|s| s.run.is_some());
            if !busy && self.queue.is_empty() {
                // Idle: sleep until a job comes, or end with the channel
                // (closed by a shutdown, which has set the flag).
                match jobs.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => {
                        self.abandon();
                        return;
                    }
                }
            }
            self.queue.extend(jobs.try_iter());
            self.drop_cancelled();
            self.admit();
            for group in self.control_groups() {
                if !same_control(self.control.as_ref(), group.as_ref()) {
                    if let Err(err) = self.eval.set_control(group.as_ref(), self.loaded.n_layer) {
                        self.fail_batch(&group, &err.to_string());
                        continue;
                    }
                    self.control = group.clone();
                }
                for &pass in self.passes {
                    self.step(pass, &group);
                }
            }
        }
    }

    /// The distinct control vectors of the runs in slots, the one set on
    /// the context first: one evaluation per vector per step, and one
    /// switch per step when plain and steered runs share the context.
    fn control_groups(&self) -> Vec<Option<ControlVector>> {
        let mut groups: Vec<Option<ControlVector>> = Vec::new();
        for run in self.slots.iter().filter_map(|s| s.run.as_ref()) {
            if !groups
                .iter()
                .any(|g| same_control(g.as_ref(), run.control.as_ref()))
            {
                groups.push(run.control.clone());
            }
        }
        if let Some(at) = groups
            .iter()
            .position(|g| same_control(g.as_ref(), self.control.as_ref()))
        {
            groups[..=at].rotate_right(1);
        }
        groups
    }

    /// Stopping: every queued job and every run ends with `ShuttingDown`.
    fn abandon(&mut self) {
        for queued in self.queue.drain(..) {
            queued.job.fail(DecoderError::ShuttingDown);
        }
        for slot in &mut self.slots {
            if let Some(run) = slot.run.take() {
                run.job.fail(DecoderError::ShuttingDown);
            }
        }
        self.active.store(0, Ordering::Relaxed);
    }

    /// Jobs whose callers gave up never start; runs whose callers gave up
    /// free their slot now.
    fn drop_cancelled(&mut self) {
        self.queue.retain(|queued| {
            let cancelled = queued.job.cancelled();
            if cancelled {
                queued.job.fail(DecoderError::Cancelled);
            }
            !cancelled
        });
        for slot in &mut self.slots {
            if slot.run.as_ref().is_some_and(|run| run.job.cancelled())
                && let Some(run) = slot.run.take()
            {
                self.active.fetch_sub(1, Ordering::Relaxed);
                run.finish(FinishReason::Cancelled);
            }
        }
    }

    /// Moves queued jobs into free slots, each into the free slot whose
    /// cells share the longest prefix with its prompt (laid out and checked
    /// by its caller already).
    fn admit(&mut self) {
        while self.slots.iter().any(|s| s.run.is_none()) {
            let Some(Queued { job, prepared }) = self.queue.pop_front() else {
                return;
            };
            crate::fault::inject(crate::fault::Point::Worker, || job.work.text());
            tracing::debug!(
                queued_ms = job.start.elapsed().as_millis() as u64,
                prompt = prepared.items.len(),
                waiting = self.queue.len(),
                "job admitted to a sequence"
            );
            let slot = self
                .slots
                .iter_mut()
                .filter(|s| s.run.is_none())
                .max_by_key(|s| (cached_prefix(s, &prepared), std::cmp::Reverse(s.used)))
                .expect("a free slot exists");
            self.clock += 1;
            slot.used = self.clock;
            let reused = reuse_prefix(&mut self.eval, slot, &prepared);
            slot.run = Some(self.loaded.start_run(job, prepared, reused));
            self.active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Evaluates one batch of `pass`'s rows and uses every logit row it
    /// produced.
    fn step(&mut self, pass: Pass, group: &Option<ControlVector>) {
        self.eval.clear();
        if let Err(err) = self.fill_batch(pass, group) {
            self.fail_batch(group, &err.to_string());
            return;
        }
        if self.eval.is_empty() {
            return;
        }
        if let Err(err) = self.eval.process() {
            self.fail_batch(group, &err.to_string());
            return;
        }
        let vocab = self.loaded.model.vocab();
        let mut bytes = Vec::new();
        for slot in &mut self.slots {
            let Some(run) = slot.run.as_mut() else {
                continue;
            };
            if !same_control(run.control.as_ref(), group.as_ref()) {
                continue;
            }
            let finish = match &mut run.task {
                Task::Score(s) => {
                    for (at, target) in s.pending.drain(..) {
                        let Item::Token(token) = run.prompt[target] else {
                            unreachable!("continuations are tokens")
                        };
                        s.logprobs.push(log_softmax_at(self.eval.logits(at), token));
                    }
                    run.prompt_done().then_some(FinishReason::Stop)
                }
                Task::Generate(g) => {
                    let Some(at) = g.logits_at.take() else {
                        continue;
                    };
                    run.prompt_time.get_or_insert_with(|| run.start.elapsed());
                    'sample: {
                        if g.generated == g.budget {
                            break 'sample Some(FinishReason::Length);
                        }
                        let token = g.picker.pick(self.eval.logits(at));
                        let request = match &run.job.work {
                            Work::Generate(request) => request,
                            Work::Score(_) => unreachable!("a generation's job"),
                        };
                        if vocab.is_eog(token) && !request.ignore_eos {
                            break 'sample Some(FinishReason::Stop);
                        }
                        g.generated += 1;
                        bytes.clear();
                        vocab.token_to_piece_into(token, &mut bytes, false, None);
                        let mut piece = String::with_capacity(
                            g.utf8
                                .max_utf8_buffer_length(bytes.len())
                                .unwrap_or(4 * bytes.len() + 16),
                        );
                        // A token may end inside a UTF-8 sequence: the decoder
                        // keeps the partial bytes for the next token instead
                        // of emitting U+FFFD.
                        let _ = g.utf8.decode_to_string(&bytes, &mut piece, false);
                        let released = g.scanner.push(&piece);
                        if !g.emit(&run.job, run.start, &released.text) {
                            break 'sample Some(FinishReason::Cancelled);
                        }
                        if released.stopped {
                            break 'sample Some(FinishReason::Stop);
                        }
                        // The last token allowed: no need to evaluate it.
                        if g.generated == g.budget {
                            break 'sample Some(FinishReason::Length);
                        }
                        g.next = Some(token);
                        None
                    }
                }
            };
            if let Some(reason) = finish
                && let Some(run) = slot.run.take()
            {
                self.active.fetch_sub(1, Ordering::Relaxed);
                run.finish(reason);
            }
        }
    }

    /// The batch for this pass: one token for each generating slot first
    /// (they are waiting on it), then prompt chunks while room is left, each
    /// up to the first item the pass does not take.
    fn fill_batch(&mut self, pass: Pass, group: &Option<ControlVector>) -> Result<(), BatchError> {
        let in_group = |run: &Run| same_control(run.control.as_ref(), group.as_ref());
        if pass != Pass::Rows {
            for slot in &mut self.slots {
                let Some(Run {
                    task: Task::Generate(g),
                    ..
                }) = slot.run.as_mut().filter(|run| in_group(run))
                else {
                    continue;
                };
                if let Some(token) = g.next.take() {
                    let at =
                        self.eval
                            .add_token(token, slot.cached.len() as i32, slot.seq, true)?;
                    slot.cached.push(Item::Token(token));
                    g.logits_at = Some(at);
                }
            }
        }
        for slot in &mut self.slots {
            let Some(run) = slot.run.as_mut().filter(|run| in_group(run)) else {
                continue;
            };
            while !run.prompt_done() && self.eval.room() > 0 && pass.takes(&run.prompt[run.fed]) {
                let i = run.fed;
                let logits = run.wants_logits(i);
                let pos = slot.cached.len() as i32;
                let at = match &run.prompt[i] {
                    Item::Token(token) => self.eval.add_token(*token, pos, slot.seq, logits)?,
                    Item::Row(rows, r) => self.eval.add_row(rows.row(*r), pos, slot.seq, logits)?,
                };
                slot.cached.push(run.prompt[i].clone());
                run.fed += 1;
                run.fed_at(i, at);
            }
            if self.eval.room() == 0 {
                break;
            }
        }
        Ok(())
    }

    /// A batch that could not be built or evaluated fails every run in it
    /// (those of `group`): the contents of their sequences are unknown, so
    /// those are cleared too.
    fn fail_batch(&mut self, group: &Option<ControlVector>, message: &str) {
        for slot in &mut self.slots {
            if slot
                .run
                .as_ref()
                .is_some_and(|run| same_control(run.control.as_ref(), group.as_ref()))
                && let Some(run) = slot.run.take()
            {
                self.active.fetch_sub(1, Ordering::Relaxed);
                // A batch cut by the stop flag (llama.cpp's abort callback)
                // is the shutdown's, not a decode failure.
                run.job.fail(if self.stop.load(Ordering::Acquire) {
                    DecoderError::ShuttingDown
                } else {
                    DecoderError::Decode(message.to_string())
                });
                self.eval.clear_seq(slot.seq, None);
                slot.cached.clear();
            }
        }
    }
}

/// log softmax(logits)[token], in f64.
fn log_softmax_at(logits: &[f32], token: LlamaToken) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[token.0 as usize] as f64 - max - sum.ln()
}

/// A job's prompt, ready for a slot.
struct Prepared {
    items: Vec<Item>,
    stops: Vec<String>,
    /// The first prompt item whose logits are needed: it is evaluated even
    /// when the slot holds it (a cell keeps no logits).
    first_logits: usize,
    /// Where a scoring's continuation starts.
    continuation: Option<usize>,
    control: Option<ControlVector>,
}

impl Loaded {
    /// A job's run state, its prompt past the reused prefix still to feed.
    fn start_run(&self, job: Job, prepared: Prepared, reused: usize) -> Run {
        let Prepared {
            items,
            stops,
            continuation,
            control,
            ..
        } = prepared;
        let task = match (&job.work, continuation) {
            (Work::Score(_), Some(from)) => Task::Score(Scoring {
                from,
                logprobs: Vec::with_capacity(items.len() - from),
                pending: Vec::new(),
            }),
            (Work::Generate(request), _) => {
                let mut picker = Picker::new(&request.sampling, random_seed);
                let tokens: Vec<LlamaToken> = items
                    .iter()
                    .filter_map(|item| match item {
                        Item::Token(t) => Some(*t),
                        Item::Row(..) => None,
                    })
                    .collect();
                picker.accept_all(&tokens);
                Task::Generate(Box::new(Generating {
                    picker,
                    budget: request.max_new_tokens.min(self.context_size - items.len()),
                    generated: 0,
                    // No BOM sniffing: the bytes are UTF-8 by definition.
                    utf8: encoding_rs::UTF_8.new_decoder_without_bom_handling(),
                    scanner: StopScanner::new(&stops),
                    text: String::new(),
                    first: None,
                    next: None,
                    logits_at: None,
                }))
            }
            (Work::Score(_), None) => unreachable!("a scoring has a continuation"),
        };
        Run {
            start: job.start,
            reused,
            fed: reused,
            prompt_time: None,
            prompt: items,
            control,
            task,
            job,
        }
    }
}

fn common_prefix(a: &[Item], b: &[Item]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x.same(y)).count()
}

/// The items of `prepared` the slot's cells already hold: none when they
/// were computed under another control vector.
fn cached_prefix(slot: &Slot, prepared: &Prepared) -> usize {
    if same_control(slot.cached_control.as_ref(), prepared.control.as_ref()) {
        common_prefix(&slot.cached, &prepared.items)
    } else {
        0
    }
}

/// How many leading prompt items can stay in the slot's sequence: the
/// common prefix with what it holds, up to `first_logits` (the first item
/// whose logits are needed must be evaluated). The rest of the sequence is
/// removed; when llama.cpp cannot remove a part (recurrent models), all of
/// it is.
fn reuse_prefix(eval: &mut Evaluator<'_>, slot: &mut Slot, prepared: &Prepared) -> usize {
    let common = cached_prefix(slot, prepared).min(prepared.first_logits);
    slot.cached_control = prepared.control.clone();
    let position = u32::try_from(common).unwrap_or(u32::MAX);
    let kept = if common > 0 && eval.clear_seq(slot.seq, Some(position)) {
        common
    } else {
        eval.clear_seq(slot.seq, None);
        0
    };
    slot.cached.truncate(kept);
    kept
}

/// The longest text any token of `model` is written as (special tokens
/// included: a prompt's `<|im_end|>` text is read as that token).
fn longest_piece(model: &LlamaModel) -> usize {
    let vocab = model.vocab();
    let mut bytes = Vec::new();
    (0..model.n_vocab().max(0))
        .map(|t| {
            bytes.clear();
            vocab.token_to_piece_into(LlamaToken(t), &mut bytes, true, None);
            bytes.len()
        })
        .max()
        .unwrap_or(0)
        .max(1)
}

/// A seed for requests that did not fix one.
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}
