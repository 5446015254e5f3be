//! The in-process llama.cpp backend (`llama-cpp-2`), with continuous
//! batching.
//!
//! The model and its context live on a thread of their own: a
//! `LlamaContext` borrows the model and is not `Send`, and a long-lived
//! owner thread is also what lets the model load once and serve every
//! request. Callers talk to it over channels: a job goes in, pieces and then
//! the result come back, and a cancel flag is checked every step.
//!
//! The context holds `parallel` sequences (slots). Each step of the worker's
//! loop builds one batch: the next token of every generating slot, then
//! prompt chunks of slots still reading their prompt, up to `n_batch`
//! tokens. A job that arrives joins at the next step; a job beyond the
//! slots waits in the worker's queue. Each slot keeps the tokens its cells
//! hold, so a prompt that shares a prefix with a slot's previous one (an
//! agent resending its conversation) only evaluates what is new.

mod sample;

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::stop::StopScanner;
use super::{
    BackendKind, CacheType, Decoder, DecoderConfig, DecoderError, FinishReason, GenerateRequest,
    Generation, Prompt, Role, Sink, prompt,
};
use sample::Picker;

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
}

enum Event {
    Piece(String),
    Done(Result<Generation, DecoderError>),
}

/// llama.cpp in-process: one model, one context of `parallel` sequences,
/// owned by a worker thread.
pub struct LlamaDecoder {
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    model_path: PathBuf,
    context_size: usize,
    /// Slots generating or reading a prompt, as the worker last saw them.
    active: Arc<AtomicUsize>,
}

impl LlamaDecoder {
    /// Loads `path` on a new worker thread and waits until it is ready.
    pub fn load(path: &Path, config: &DecoderConfig) -> Result<Self, DecoderError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let model_path = path.to_path_buf();
        let (worker_path, worker_config, worker_active) =
            (model_path.clone(), config.clone(), Arc::clone(&active));
        let worker = std::thread::Builder::new()
            .name("tofy-llama".into())
            // llama.cpp's tokenizers may recurse deeply (std::regex) on long text.
            .stack_size(8 << 20)
            .spawn(move || {
                run_worker(
                    &worker_path,
                    &worker_config,
                    &ready_tx,
                    &jobs_rx,
                    &worker_active,
                );
            })?;
        match ready_rx.recv() {
            Ok(Ok(context_size)) => Ok(Self {
                jobs: Some(jobs_tx),
                worker: Some(worker),
                model_path,
                context_size,
                active,
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

    fn active_sequences(&self) -> Option<usize> {
        Some(self.active.load(Ordering::Relaxed))
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        sink: &mut Sink<'_>,
    ) -> Result<Generation, DecoderError> {
        let (events_tx, events_rx) = mpsc::channel();
        let cancel = request.cancel.clone().unwrap_or_default();
        let job = Job {
            request: request.clone(),
            events: events_tx,
            cancel: Arc::clone(&cancel),
            start: Instant::now(),
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

/// The worker thread: load, report readiness, then schedule jobs until the
/// channel closes.
fn run_worker(
    path: &Path,
    config: &DecoderConfig,
    ready: &mpsc::Sender<Result<usize, DecoderError>>,
    jobs: &mpsc::Receiver<Job>,
    active: &AtomicUsize,
) {
    let loaded = match Loaded::open(path, config) {
        Ok(loaded) => loaded,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    let context = match loaded.context(config) {
        Ok(context) => context,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    if ready.send(Ok(loaded.context_size)).is_err() {
        return;
    }
    Scheduler::new(&loaded, context, config.parallel, active).run(jobs);
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

    /// The prompt's tokens and stop strings, or why it cannot run.
    fn prepare(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Vec<LlamaToken>, Vec<String>), DecoderError> {
        let (text, mut stops) = self.format(&request.prompt)?;
        stops.extend(request.stop.iter().cloned());
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(DecoderError::EmptyPrompt);
        }
        // At least one position must remain for the first generated token.
        if tokens.len() >= self.context_size {
            return Err(DecoderError::ContextExceeded {
                prompt_tokens: tokens.len(),
                context: self.context_size,
            });
        }
        Ok((tokens, stops))
    }
}

/// One sequence of the context.
struct Slot {
    seq: i32,
    /// Tokens whose keys and values this sequence holds, from position 0.
    cached: Vec<LlamaToken>,
    /// When it last took a job: the least recently used slot is reused first.
    used: u64,
    run: Option<Run>,
}

/// A job in a slot: where it is in its prompt and its reply.
struct Run {
    job: Job,
    start: Instant,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens kept from the slot's previous contents.
    reused: usize,
    /// Prompt tokens sent to the context so far (from `reused`).
    fed: usize,
    prompt_time: Option<Duration>,
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

impl Run {
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

    /// Flushes what the UTF-8 decoder and stop scanner still hold (unless
    /// cancelled) and reports the result.
    fn finish(mut self, finish_reason: FinishReason) {
        if finish_reason != FinishReason::Cancelled {
            let mut rest = String::with_capacity(16);
            let _ = self.utf8.decode_to_string(&[], &mut rest, true);
            rest.push_str(&self.scanner.finish());
            self.emit(&rest);
        }
        let total_time = self.start.elapsed();
        self.job.finish(Ok(Generation {
            text: std::mem::take(&mut self.text),
            finish_reason,
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.reused,
            completion_tokens: self.generated,
            time_to_first_token: self.first.unwrap_or(total_time),
            prompt_time: self.prompt_time,
            total_time,
        }));
    }
}

/// The continuous-batching loop over the slots of one context.
struct Scheduler<'m> {
    loaded: &'m Loaded,
    context: LlamaContext<'m>,
    slots: Vec<Slot>,
    queue: VecDeque<Job>,
    batch: LlamaBatch<'static>,
    n_batch: usize,
    clock: u64,
    /// Runs in slots, published for metrics. Lowered before a run reports
    /// its end, so a caller that has its result never sees it counted.
    active: &'m AtomicUsize,
}

impl<'m> Scheduler<'m> {
    fn new(
        loaded: &'m Loaded,
        context: LlamaContext<'m>,
        parallel: usize,
        active: &'m AtomicUsize,
    ) -> Self {
        let n_batch = context.n_batch() as usize;
        let slots = (0..parallel.max(1))
            .map(|seq| Slot {
                seq: seq as i32,
                cached: Vec::new(),
                used: 0,
                run: None,
            })
            .collect();
        Self {
            loaded,
            context,
            slots,
            queue: VecDeque::new(),
            batch: LlamaBatch::new(n_batch, 1),
            n_batch,
            clock: 0,
            active,
        }
    }

    fn run(mut self, jobs: &mpsc::Receiver<Job>) {
        loop {
            let busy = self.slots.iter().any(|s| s.run.is_some());
            if !busy && self.queue.is_empty() {
                // Idle: sleep until a job comes, or end with the channel.
                match jobs.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => return,
                }
            }
            self.queue.extend(jobs.try_iter());
            self.drop_cancelled();
            self.admit();
            self.step();
        }
    }

    /// Jobs whose callers gave up never start; runs whose callers gave up
    /// free their slot now.
    fn drop_cancelled(&mut self) {
        self.queue.retain(|job| {
            let cancelled = job.cancelled();
            if cancelled {
                job.finish(Ok(Generation::cancelled()));
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
    /// cells share the longest prefix with its prompt.
    fn admit(&mut self) {
        while self.slots.iter().any(|s| s.run.is_none()) {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            let (prompt, stops) = match self.loaded.prepare(&job.request) {
                Ok(prepared) => prepared,
                Err(err) => {
                    job.finish(Err(err));
                    continue;
                }
            };
            let slot = self
                .slots
                .iter_mut()
                .filter(|s| s.run.is_none())
                .max_by_key(|s| (common_prefix(&s.cached, &prompt), std::cmp::Reverse(s.used)))
                .expect("a free slot exists");
            self.clock += 1;
            slot.used = self.clock;
            let reused = reuse_prefix(&mut self.context, slot, &prompt);
            slot.run = Some(self.loaded.start_run(job, prompt, stops, reused));
            self.active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Evaluates one batch and samples every slot whose logits it produced.
    fn step(&mut self) {
        self.batch.clear();
        if let Err(err) = self.fill_batch() {
            self.fail_batch(&err.to_string());
            return;
        }
        if self.batch.n_tokens() == 0 {
            return;
        }
        if let Err(err) = self.context.decode(&mut self.batch) {
            self.fail_batch(&err.to_string());
            return;
        }
        let vocab = self.loaded.model.vocab();
        let mut bytes = Vec::new();
        for slot in &mut self.slots {
            let Some(run) = slot.run.as_mut() else {
                continue;
            };
            let Some(at) = run.logits_at.take() else {
                continue;
            };
            run.prompt_time.get_or_insert_with(|| run.start.elapsed());
            let finish = 'sample: {
                if run.generated == run.budget {
                    break 'sample Some(FinishReason::Length);
                }
                let token = run.picker.pick(self.context.get_logits_ith(at));
                if vocab.is_eog(token) && !run.job.request.ignore_eos {
                    break 'sample Some(FinishReason::Stop);
                }
                run.generated += 1;
                bytes.clear();
                vocab.token_to_piece_into(token, &mut bytes, false, None);
                let mut piece = String::with_capacity(
                    run.utf8
                        .max_utf8_buffer_length(bytes.len())
                        .unwrap_or(4 * bytes.len() + 16),
                );
                // A token may end inside a UTF-8 sequence: the decoder keeps
                // the partial bytes for the next token instead of emitting
                // U+FFFD.
                let _ = run.utf8.decode_to_string(&bytes, &mut piece, false);
                let released = run.scanner.push(&piece);
                if !run.emit(&released.text) {
                    break 'sample Some(FinishReason::Cancelled);
                }
                if released.stopped {
                    break 'sample Some(FinishReason::Stop);
                }
                // The last token allowed: no need to evaluate it.
                if run.generated == run.budget {
                    break 'sample Some(FinishReason::Length);
                }
                run.next = Some(token);
                None
            };
            if let Some(reason) = finish
                && let Some(run) = slot.run.take()
            {
                self.active.fetch_sub(1, Ordering::Relaxed);
                run.finish(reason);
            }
        }
    }

    /// The batch for this step: one token for each generating slot first
    /// (they are waiting on it), then prompt chunks while room is left.
    fn fill_batch(&mut self) -> Result<(), llama_cpp_2::llama_batch::BatchAddError> {
        let mut room = self.n_batch;
        for slot in &mut self.slots {
            let Some(run) = slot.run.as_mut() else {
                continue;
            };
            if let Some(token) = run.next.take() {
                self.batch
                    .add(token, slot.cached.len() as i32, &[slot.seq], true)?;
                slot.cached.push(token);
                run.logits_at = Some(self.batch.n_tokens() - 1);
                room -= 1;
            }
        }
        for slot in &mut self.slots {
            let Some(run) = slot.run.as_mut() else {
                continue;
            };
            if room == 0 {
                break;
            }
            let remaining = run.prompt.len() - run.fed;
            if remaining == 0 {
                continue;
            }
            let take = remaining.min(room);
            for &token in &run.prompt[run.fed..run.fed + take] {
                run.fed += 1;
                let last = run.fed == run.prompt.len();
                self.batch
                    .add(token, slot.cached.len() as i32, &[slot.seq], last)?;
                slot.cached.push(token);
            }
            if run.fed == run.prompt.len() {
                run.logits_at = Some(self.batch.n_tokens() - 1);
            }
            room -= take;
        }
        Ok(())
    }

    /// A batch that could not be built or evaluated fails every run: the
    /// contents of their sequences are unknown, so those are cleared too.
    fn fail_batch(&mut self, message: &str) {
        for slot in &mut self.slots {
            if let Some(run) = slot.run.take() {
                self.active.fetch_sub(1, Ordering::Relaxed);
                run.job
                    .finish(Err(DecoderError::Decode(message.to_string())));
                let _ = self
                    .context
                    .clear_kv_cache_seq(Some(slot.seq as u32), None, None);
                slot.cached.clear();
            }
        }
    }
}

impl Loaded {
    /// A job's run state, its prompt past the reused prefix still to feed.
    fn start_run(
        &self,
        job: Job,
        prompt: Vec<LlamaToken>,
        stops: Vec<String>,
        reused: usize,
    ) -> Run {
        let request = &job.request;
        let mut picker = Picker::new(&request.sampling, random_seed);
        picker.accept_all(&prompt);
        let budget = request.max_new_tokens.min(self.context_size - prompt.len());
        Run {
            start: job.start,
            reused,
            fed: reused,
            prompt_time: None,
            picker,
            budget,
            generated: 0,
            // No BOM sniffing: the bytes are UTF-8 by definition.
            utf8: encoding_rs::UTF_8.new_decoder_without_bom_handling(),
            scanner: StopScanner::new(&stops),
            text: String::new(),
            first: None,
            next: None,
            logits_at: None,
            prompt,
            job,
        }
    }
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How many leading prompt tokens can stay in the slot's sequence: the
/// common prefix with what it holds, less one so the last prompt token is
/// evaluated (its logits pick the first new token). The rest of the
/// sequence is removed; when llama.cpp cannot remove a part (recurrent
/// models), all of it is.
fn reuse_prefix(context: &mut LlamaContext<'_>, slot: &mut Slot, tokens: &[LlamaToken]) -> usize {
    let common = common_prefix(&slot.cached, tokens).min(tokens.len() - 1);
    let seq = Some(slot.seq as u32);
    let position = u32::try_from(common).unwrap_or(u32::MAX);
    let kept = if common > 0 && context.clear_kv_cache_seq(seq, Some(position), None) == Ok(true) {
        common
    } else {
        let _ = context.clear_kv_cache_seq(seq, None, None);
        0
    };
    slot.cached.truncate(kept);
    kept
}

/// A seed for requests that did not fix one.
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}
