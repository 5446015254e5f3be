//! The llama.cpp calls `llama-cpp-2` does not wrap, behind a safe API.
//!
//! - [`Evaluator`]: a context with one `llama_batch_ext`, whose rows may be
//!   tokens or embedding rows, mixed in one `llama_process` call (llama.cpp
//!   allows the mix for every architecture but the few in
//!   [`NO_MIXED_BATCH_ARCHS`]; the scheduler splits the batch for those).
//! - [`TokenEmbeddings`]: the input-embedding row of any token, read from the
//!   GGUF file with the gguf C API and dequantized by ggml's own `to_float`
//!   (the function llama.cpp's CPU `get_rows` uses), so an injected row
//!   reproduces the token path.
//! - [`Evaluator::set_control`]: the context's control vector
//!   (`llama_set_adapter_cvec`, which `llama-cpp-2` does not wrap).
//! - [`ResidualReader`]: the mean residual stream (`l_out-<layer>`) over a
//!   span of a prompt, read through llama.cpp's graph callback (`cb_eval`),
//!   which `fit-control` regresses onto.
//! - [`input_width`] and [`architecture`] of a loaded model.
//!
//! Every `unsafe` block is here; the rest of the decoder only sees safe
//! calls. The raw pointers come from the patched `llama-cpp-2` in
//! `vendor/` (`as_ptr` / `as_mut_ptr`).

use std::ffi::{CStr, CString, c_void};
use std::num::NonZeroU32;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as sys;

use crate::decoder::ControlVector;

/// Architectures whose graphs pick weights or routing per ubatch by token vs
/// embedding input, so llama.cpp refuses batches that mix both
/// (`llm_arch_supports_mixed_batch` in `src/llama-arch.cpp` of the bundled
/// llama.cpp).
pub const NO_MIXED_BATCH_ARCHS: [&str; 6] = [
    "cogvlm",
    "deepseek4",
    "graniteswitch",
    "eagle3",
    "dflash",
    "gemma4-assistant",
];

/// Architectures that multiply token rows by sqrt(n_embd) inside the graph
/// but take embedding rows as they are (`build_inp_embd(tok_embd,
/// sqrtf(n_embd))`): their input rows are the table's rows scaled.
const SCALED_INPUT_ARCHS: [&str; 4] = ["gemma3", "gemma3n", "gemma4", "gemma-embedding"];

/// Why a row could not join a batch, or the batch could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the batch is full ({0} rows)")]
    Full(usize),
    #[error("llama.cpp refused a batch row (code {0})")]
    Row(i32),
    #[error("llama.cpp could not evaluate the batch (code {0})")]
    Process(i32),
    #[error("llama.cpp refused the control vector")]
    Control,
}

/// A context and the one extended batch it evaluates. The batch holds a
/// pointer into the context's memory, so it is freed first (in `Drop`,
/// which runs before the fields are dropped).
pub struct Evaluator<'m> {
    batch: NonNull<sys::llama_batch_ext>,
    rows: usize,
    capacity: usize,
    context: LlamaContext<'m>,
}

impl<'m> Evaluator<'m> {
    /// An evaluator with room for the context's `n_batch` rows per call.
    pub fn new(mut context: LlamaContext<'m>) -> Self {
        let capacity = context.n_batch() as usize;
        // SAFETY: the pointer is a live context; the batch it returns is
        // freed in Drop before the context is.
        let raw = unsafe { sys::llama_batch_ext_init(context.as_mut_ptr()) };
        let batch = NonNull::new(raw).expect("llama_batch_ext_init returned no batch");
        Self {
            batch,
            rows: 0,
            capacity,
            context,
        }
    }

    /// Makes every later evaluation give up once `stop` is set: llama.cpp
    /// asks its abort callback between graph nodes, so a shutdown waits for
    /// one node, not for a whole prompt chunk (seconds of `n_batch` tokens
    /// on a slow CPU). An evaluation cut this way fails with
    /// [`BatchError::Process`]; the sequences it touched are then unknown.
    pub fn abort_when(&mut self, stop: &'m AtomicBool) {
        unsafe extern "C" fn stopped(data: *mut c_void) -> bool {
            // SAFETY: `data` is the `&'m AtomicBool` registered below, and
            // it outlives the context (`'m`), the only caller.
            unsafe { &*data.cast::<AtomicBool>() }.load(Ordering::Relaxed)
        }
        let data = std::ptr::from_ref(stop).cast_mut().cast::<c_void>();
        // SAFETY: the context is live; llama.cpp keeps the callback and its
        // data pointer, which stays valid for the context's lifetime.
        unsafe { sys::llama_set_abort_callback(self.context.as_mut_ptr(), Some(stopped), data) };
    }

    pub fn context(&self) -> &LlamaContext<'m> {
        &self.context
    }

    /// Removes sequence `seq`'s cells from position `from` on (all of them
    /// with `None`); false when llama.cpp cannot remove a part (recurrent
    /// models). The context itself is never handed out mutably: the batch
    /// points into it, and must not outlive it.
    pub fn clear_seq(&mut self, seq: i32, from: Option<u32>) -> bool {
        // A negative id would mean "every sequence" to llama.cpp.
        let Ok(seq) = u32::try_from(seq) else {
            return false;
        };
        self.context
            .clear_kv_cache_seq(Some(seq), from, None)
            .unwrap_or(false)
    }

    /// Empties every sequence.
    pub fn clear_all(&mut self) {
        self.context.clear_kv_cache();
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows that still fit.
    pub fn room(&self) -> usize {
        self.capacity - self.rows
    }

    pub fn clear(&mut self) {
        // SAFETY: the batch is live.
        unsafe { sys::llama_batch_ext_clear(self.batch.as_ptr()) };
        self.rows = 0;
    }

    /// Adds a token at `pos` of `seq`; returns its batch index (where its
    /// logits are read when `logits` is set).
    pub fn add_token(
        &mut self,
        token: LlamaToken,
        pos: i32,
        seq: i32,
        logits: bool,
    ) -> Result<i32, BatchError> {
        self.check_room()?;
        // SAFETY: the batch is live; llama.cpp checks the id and the seq.
        let idx = unsafe { sys::llama_batch_ext_add_token(self.batch.as_ptr(), seq, token.0) };
        self.place(idx, pos, logits)
    }

    /// Adds an embedding row (`n_embd_inp` floats; llama.cpp copies them)
    /// at `pos` of `seq`.
    pub fn add_row(
        &mut self,
        row: &[f32],
        pos: i32,
        seq: i32,
        logits: bool,
    ) -> Result<i32, BatchError> {
        self.check_room()?;
        let embd = sys::llama_embd {
            data: row.as_ptr(),
            n_rows: 1,
            n_embd: row.len(),
        };
        // SAFETY: `row` outlives the call and llama.cpp copies it; a row of
        // the wrong width is refused (-2), not read past.
        let idx = unsafe { sys::llama_batch_ext_add_embd(self.batch.as_ptr(), seq, embd) };
        self.place(idx, pos, logits)
    }

    fn check_room(&self) -> Result<(), BatchError> {
        if self.rows == self.capacity {
            Err(BatchError::Full(self.capacity))
        } else {
            Ok(())
        }
    }

    /// Sets the position (mandatory: the default is 0) and output flag of
    /// the row llama.cpp just added at `idx`.
    fn place(&mut self, idx: i32, pos: i32, logits: bool) -> Result<i32, BatchError> {
        if idx < 0 {
            return Err(BatchError::Row(idx));
        }
        // llama.cpp reads one position for a token row and n_pos_per_embd
        // (up to 4, M-RoPE models) for an embedding row: four positions, as
        // llama.cpp itself expands a text position for M-RoPE, cover both.
        let positions = [pos, pos, pos, 0];
        // SAFETY: `idx` is a row of this live batch; llama.cpp copies at
        // most four positions, which `positions` holds, during the call.
        let placed = unsafe {
            sys::llama_batch_ext_set_pos(self.batch.as_ptr(), idx, positions.as_ptr())
                && sys::llama_batch_ext_set_output_logits(self.batch.as_ptr(), idx, logits)
        };
        if !placed {
            return Err(BatchError::Row(-2));
        }
        self.rows += 1;
        Ok(idx)
    }

    /// Evaluates the batch (`llama_process`, llama_decode's return codes).
    pub fn process(&mut self) -> Result<(), BatchError> {
        // SAFETY: both pointers are live; the batch holds at most n_batch
        // rows (checked on add), which llama.cpp asserts.
        let code = unsafe {
            sys::llama_process(
                self.context.as_mut_ptr(),
                sys::LLAMA_PROCESS_TYPE_DECODE,
                self.batch.as_ptr(),
            )
        };
        if code == 0 {
            Ok(())
        } else {
            Err(BatchError::Process(code))
        }
    }

    /// Sets the control vector every later evaluation adds (`None` clears
    /// it). llama.cpp re-reserves its graph at the next evaluation.
    pub fn set_control(
        &mut self,
        control: Option<&ControlVector>,
        n_layer: usize,
    ) -> Result<(), BatchError> {
        let code = match control {
            // SAFETY: the context is live; a null buffer only clears.
            None => unsafe {
                sys::llama_set_adapter_cvec(
                    self.context.as_mut_ptr(),
                    std::ptr::null(),
                    0,
                    0,
                    -1,
                    -1,
                )
            },
            Some(control) => {
                let buffer = control.llama_buffer(n_layer);
                let layers = control.layers();
                let as_i32 = |v: usize| i32::try_from(v).map_err(|_| BatchError::Control);
                // SAFETY: `buffer` holds `n_embd` values for each of layers
                // 1..n_layer, as llama.cpp reads it (it copies them during the
                // call); the width was checked against the model's n_embd.
                unsafe {
                    sys::llama_set_adapter_cvec(
                        self.context.as_mut_ptr(),
                        buffer.as_ptr(),
                        buffer.len(),
                        as_i32(control.width())?,
                        as_i32(*layers.start())?,
                        as_i32(*layers.end())?,
                    )
                }
            }
        };
        if code == 0 {
            Ok(())
        } else {
            Err(BatchError::Control)
        }
    }

    /// The logits of the row at batch index `idx` of the last evaluation.
    pub fn logits(&self, idx: i32) -> &[f32] {
        self.context.get_logits_ith(idx)
    }
}

impl Drop for Evaluator<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_ext_init, freed once, before the
        // context it points into.
        unsafe { sys::llama_batch_ext_free(self.batch.as_ptr()) };
    }
}

/// What the graph callback gathers: for each span of batch rows, the
/// per-column sums of those rows of each `l_out-<layer>` tensor for layers
/// in `layers`, and how many rows were added.
struct Tap {
    layers: RangeInclusive<usize>,
    n_embd: usize,
    spans: Vec<Range<usize>>,
    sums: Vec<Vec<f64>>,
    rows: Vec<usize>,
    /// A tensor of an unexpected type or shape was seen.
    bad: bool,
}

impl Tap {
    /// The layer of a residual-stream tensor this tap wants, by name.
    fn wanted(&self, name: &str) -> Option<usize> {
        name.strip_prefix("l_out-")
            .and_then(|il| il.parse::<usize>().ok())
            .filter(|il| self.layers.contains(il))
    }
}

/// llama.cpp's `cb_eval`: asked first whether a tensor is wanted, then
/// called again once it is computed. After the last wanted layer it
/// answers false, which ends the evaluation there (`ggml_backend_sched`
/// stops the graph; the logits are left unset and never read): the layers
/// above and the output head are not computed at all.
unsafe extern "C" fn tap_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user_data: *mut c_void,
) -> bool {
    // SAFETY: llama.cpp passes a live tensor and the user data given at
    // context creation, a `Tap` the `ResidualReader` owns and does not touch
    // while it evaluates.
    let (tensor, tap) = unsafe { (&*t, &mut *user_data.cast::<Tap>()) };
    // SAFETY: a tensor's name is a NUL-terminated array.
    let name = unsafe { CStr::from_ptr(tensor.name.as_ptr()) };
    let layer = name.to_str().ok().and_then(|n| tap.wanted(n));
    let Some(layer) = layer else {
        return !ask;
    };
    if ask {
        return true;
    }
    let (width, rows) = (tensor.ne[0] as usize, tensor.ne[1] as usize);
    if tensor.type_ != sys::GGML_TYPE_F32
        || width != tap.n_embd
        || tensor.ne[2] != 1
        || tensor.ne[3] != 1
        || tensor.nb[0] != 4
        || tap.spans.iter().any(|s| s.end > rows)
    {
        tap.bad = true;
        return true;
    }
    let stride = tensor.nb[1];
    let mut row = vec![0.0f32; width];
    for (k, span) in tap.spans.iter().enumerate() {
        for r in span.clone() {
            // SAFETY: row r lies inside the tensor (r < ne[1], stride
            // nb[1]); ggml copies it from whichever backend holds it.
            unsafe {
                sys::ggml_backend_tensor_get(t, row.as_mut_ptr().cast(), r * stride, width * 4);
            }
            for (s, v) in tap.sums[k].iter_mut().zip(&row) {
                *s += f64::from(*v);
            }
            tap.rows[k] += 1;
        }
    }
    layer != *tap.layers.end()
}

/// Why a residual mean could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResidualError {
    #[error("llama.cpp could not create a context to read the residual stream")]
    Context,
    #[error("the prompts are {len} tokens in all; at most {max} fit one pass")]
    TooLong { len: usize, max: usize },
    #[error("{count} prompts in one pass; at most {max}")]
    TooMany { count: usize, max: usize },
    #[error("nothing to average: the span starts at {from} of {len} tokens")]
    EmptySpan { from: usize, len: usize },
    #[error(
        "layer range {start}..={end} is outside this model's layers 0..={last} (the last layer, {n_layer} - 1, only keeps output rows)",
        last = n_layer.saturating_sub(2)
    )]
    Layers {
        start: usize,
        end: usize,
        n_layer: usize,
    },
    #[error(
        "llama.cpp's residual tensors were not the expected f32 [n_embd, tokens] (or none was seen)"
    )]
    Shape,
    #[error(transparent)]
    Batch(#[from] BatchError),
}

/// Reads the mean residual stream over spans of prompts: a context of its
/// own (one sequence per prompt, a unified cache and the whole pass in one
/// ubatch, so that a tensor's rows are the prompts' tokens in the order
/// they were added), with the graph callback set.
pub struct ResidualReader<'m> {
    /// Declared before the tap: fields drop in order, so the context is
    /// freed before the tap it calls into.
    eval: Evaluator<'m>,
    tap: TapBox,
    max_tokens: usize,
    max_prompts: usize,
}

impl<'m> ResidualReader<'m> {
    /// A reader of layers `layers` (each adds its output's rows) for up to
    /// `max_prompts` prompts of `max_tokens` tokens in all per pass.
    pub fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        layers: RangeInclusive<usize>,
        max_tokens: u32,
        max_prompts: u32,
        threads: i32,
    ) -> Result<Self, ResidualError> {
        let n_layer = model.n_layer() as usize;
        // The last layer keeps only the rows whose logits are asked for, so
        // its output is not a whole prompt's residual stream.
        if layers.start() > layers.end() || *layers.end() + 1 >= n_layer {
            return Err(ResidualError::Layers {
                start: *layers.start(),
                end: *layers.end(),
                n_layer,
            });
        }
        let n_embd = usize::try_from(model.n_embd()).unwrap_or(0);
        let tap = Box::into_raw(Box::new(Tap {
            layers,
            n_embd,
            spans: Vec::new(),
            sums: Vec::new(),
            rows: Vec::new(),
            bad: false,
        }));
        let tap = TapBox(NonNull::new(tap).expect("a Box is never null"));
        // SAFETY: the tap stays allocated until after the context is freed
        // (field order); the callback matches llama.cpp's signature.
        let params = unsafe {
            LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(max_tokens))
                .with_n_batch(max_tokens)
                .with_n_ubatch(max_tokens)
                .with_n_seq_max(max_prompts.max(1))
                .with_kv_unified(true)
                .with_n_threads(threads)
                .with_n_threads_batch(threads)
                .with_cb_eval(Some(tap_callback), tap.0.as_ptr().cast())
        };
        let context = model
            .new_context(backend, params)
            .map_err(|_| ResidualError::Context)?;
        Ok(Self {
            eval: Evaluator::new(context),
            tap,
            max_tokens: max_tokens as usize,
            max_prompts: max_prompts.max(1) as usize,
        })
    }

    /// The mean, over tokens `from..` of `tokens` and over the reader's
    /// layers, of the residual stream after each layer (`n_embd` values).
    pub fn span_mean(
        &mut self,
        tokens: &[LlamaToken],
        from: usize,
    ) -> Result<Vec<f32>, ResidualError> {
        Ok(self.span_means(&[(tokens, from)])?.remove(0))
    }

    /// [`Self::span_mean`] for several prompts in one pass, each in a
    /// sequence of its own.
    pub fn span_means(
        &mut self,
        prompts: &[(&[LlamaToken], usize)],
    ) -> Result<Vec<Vec<f32>>, ResidualError> {
        let total: usize = prompts.iter().map(|(t, _)| t.len()).sum();
        if total > self.max_tokens {
            return Err(ResidualError::TooLong {
                len: total,
                max: self.max_tokens,
            });
        }
        if prompts.len() > self.max_prompts {
            return Err(ResidualError::TooMany {
                count: prompts.len(),
                max: self.max_prompts,
            });
        }
        let mut spans = Vec::with_capacity(prompts.len());
        let mut offset = 0;
        for &(tokens, from) in prompts {
            if from >= tokens.len() {
                return Err(ResidualError::EmptySpan {
                    from,
                    len: tokens.len(),
                });
            }
            spans.push(offset + from..offset + tokens.len());
            offset += tokens.len();
        }
        {
            // SAFETY: no evaluation runs, so the callback does not hold it.
            let tap = unsafe { self.tap.0.as_mut() };
            tap.sums = vec![vec![0.0; tap.n_embd]; spans.len()];
            tap.rows = vec![0; spans.len()];
            tap.spans = spans;
            tap.bad = false;
        }
        self.eval.clear_all();
        self.eval.clear();
        for (seq, &(tokens, _)) in prompts.iter().enumerate() {
            for (i, &token) in tokens.iter().enumerate() {
                let last = seq + 1 == prompts.len() && i + 1 == tokens.len();
                self.eval.add_token(token, i as i32, seq as i32, last)?;
            }
        }
        self.eval.process()?;
        // SAFETY: the evaluation is over.
        let tap = unsafe { self.tap.0.as_ref() };
        if tap.bad || tap.rows.contains(&0) {
            return Err(ResidualError::Shape);
        }
        Ok(tap
            .sums
            .iter()
            .zip(&tap.rows)
            .map(|(sums, &rows)| sums.iter().map(|s| (s / rows as f64) as f32).collect())
            .collect())
    }
}

/// The tap's allocation, freed when this drops: after the context that
/// calls into it, as `ResidualReader` declares it after its evaluator.
struct TapBox(NonNull<Tap>);

impl Drop for TapBox {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw, freed once, no context left to call it.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// The width of an embedding row for `model` (`n_embd_inp`: `n_embd` for
/// most models, wider for deepstack ones).
pub fn input_width(model: &LlamaModel) -> usize {
    // SAFETY: a read of a live model's hyperparameters.
    let n = unsafe { sys::llama_model_n_embd_inp(model.as_ptr()) };
    usize::try_from(n).unwrap_or(0)
}

/// `general.architecture` of a loaded model (`llama`, `gemma3`, ...).
pub fn architecture(model: &LlamaModel) -> String {
    model
        .meta_val_str("general.architecture")
        .unwrap_or_default()
}

/// What can go wrong reading token embeddings from a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum TokenEmbeddingsError {
    #[error("{0}: not a readable GGUF file")]
    NotGguf(PathBuf),
    #[error("{0}: no token_embd.weight tensor (not a decoder GGUF?)")]
    NoTable(PathBuf),
    #[error("{path}: token_embd.weight has type {ty}, which ggml cannot dequantize on the CPU")]
    Type { path: PathBuf, ty: u32 },
    #[error("{path}: {what}")]
    Layout { path: PathBuf, what: String },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("token id {token} is not in the embedding table (0..{n_vocab})")]
    Token { token: i32, n_vocab: usize },
}

/// A GGUF file's token-embedding table, memory-mapped, read row by row.
pub struct TokenEmbeddings {
    map: memmap2::Mmap,
    /// Byte offset of the table in the file.
    offset: usize,
    row_bytes: usize,
    ty: sys::ggml_type,
    width: usize,
    n_vocab: usize,
    /// sqrt(n_embd) for the Gemma 3/3n/4 family, 1 otherwise.
    scale: f32,
}

impl TokenEmbeddings {
    /// Reads the table's layout from `path` (nothing is dequantized yet).
    pub fn open(path: &Path) -> Result<Self, TokenEmbeddingsError> {
        let gguf = Gguf::open(path)?;
        let layout_error = |what: String| TokenEmbeddingsError::Layout {
            path: path.to_path_buf(),
            what,
        };
        let arch = gguf
            .string("general.architecture")
            .ok_or_else(|| layout_error("no general.architecture".into()))?;
        let width = gguf
            .u32(&format!("{arch}.embedding_length"))
            .ok_or_else(|| layout_error(format!("no {arch}.embedding_length")))?
            as usize;
        let table = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| TokenEmbeddingsError::NoTable(path.to_path_buf()))?;
        if table.ty >= sys::GGML_TYPE_COUNT {
            return Err(TokenEmbeddingsError::Type {
                path: path.to_path_buf(),
                ty: table.ty,
            });
        }
        // SAFETY: a known type's traits are static data; ggml_row_size
        // asserts whole blocks, checked first.
        let (to_float, row_bytes) = unsafe {
            let traits = sys::ggml_get_type_traits(table.ty);
            let block = usize::try_from(sys::ggml_blck_size(table.ty)).unwrap_or(0);
            if block == 0 || !width.is_multiple_of(block) {
                return Err(layout_error(format!(
                    "embedding_length {width} is not a whole number of {block}-value blocks"
                )));
            }
            let row_bytes = sys::ggml_row_size(table.ty, width as i64);
            ((*traits).to_float, row_bytes)
        };
        if table.ty != sys::GGML_TYPE_F32 && to_float.is_none() {
            return Err(TokenEmbeddingsError::Type {
                path: path.to_path_buf(),
                ty: table.ty,
            });
        }
        if row_bytes == 0 || !table.size.is_multiple_of(row_bytes) {
            return Err(layout_error(format!(
                "token_embd.weight is {} bytes, not a whole number of {row_bytes}-byte rows",
                table.size
            )));
        }
        let file = std::fs::File::open(path)
            .map_err(|e| TokenEmbeddingsError::Io(path.to_path_buf(), e))?;
        // SAFETY: the file is opened read-only; a GGUF that changes under a
        // running decoder is outside what llama.cpp supports either.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| TokenEmbeddingsError::Io(path.to_path_buf(), e))?;
        if table
            .offset
            .checked_add(table.size)
            .is_none_or(|end| end > map.len())
        {
            return Err(layout_error(
                "token_embd.weight runs past the end of the file (truncated?)".into(),
            ));
        }
        let scale = if SCALED_INPUT_ARCHS.contains(&arch.as_str()) {
            (width as f32).sqrt()
        } else {
            1.0
        };
        Ok(Self {
            offset: table.offset,
            n_vocab: table.size / row_bytes,
            row_bytes,
            ty: table.ty,
            width,
            scale,
            map,
        })
    }

    /// Floats per row (the model's `n_embd`).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows in the table.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// The input row of `token` into `out` (`width` floats): the table's
    /// row dequantized, times the model's input scale where it has one.
    pub fn row_into(&self, token: i32, out: &mut [f32]) -> Result<(), TokenEmbeddingsError> {
        assert_eq!(out.len(), self.width, "output row of the wrong width");
        let index = usize::try_from(token)
            .ok()
            .filter(|&t| t < self.n_vocab)
            .ok_or(TokenEmbeddingsError::Token {
                token,
                n_vocab: self.n_vocab,
            })?;
        let start = self.offset + index * self.row_bytes;
        let bytes = &self.map[start..start + self.row_bytes];
        if self.ty == sys::GGML_TYPE_F32 {
            for (o, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            }
        } else {
            // SAFETY: `bytes` is one whole row of this type (checked at
            // open), `out` holds `width` floats, and to_float reads one row.
            unsafe {
                let traits = sys::ggml_get_type_traits(self.ty);
                let to_float = (*traits).to_float.expect("checked at open");
                to_float(
                    bytes.as_ptr().cast::<c_void>(),
                    out.as_mut_ptr(),
                    self.width as i64,
                );
            }
        }
        if self.scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= self.scale);
        }
        Ok(())
    }

    /// The input rows of `tokens`, row-major.
    pub fn rows(&self, tokens: &[i32]) -> Result<Vec<f32>, TokenEmbeddingsError> {
        let mut out = vec![0.0; tokens.len() * self.width];
        for (&token, row) in tokens.iter().zip(out.chunks_exact_mut(self.width)) {
            self.row_into(token, row)?;
        }
        Ok(out)
    }
}

/// A GGUF header read with the gguf C API (metadata and tensor layout only).
struct Gguf(NonNull<sys::gguf_context>);

struct TensorInfo {
    ty: sys::ggml_type,
    /// Absolute byte offset in the file.
    offset: usize,
    size: usize,
}

impl Gguf {
    fn open(path: &Path) -> Result<Self, TokenEmbeddingsError> {
        let not_gguf = || TokenEmbeddingsError::NotGguf(path.to_path_buf());
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| not_gguf())?;
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: a NUL-terminated path; with no_alloc and no ggml context
        // only the header is read.
        let raw = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        NonNull::new(raw).map(Self).ok_or_else(not_gguf)
    }

    fn key(&self, key: &str) -> Option<i64> {
        let c_key = CString::new(key).ok()?;
        // SAFETY: a live context and a NUL-terminated key.
        let id = unsafe { sys::gguf_find_key(self.0.as_ptr(), c_key.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn string(&self, key: &str) -> Option<String> {
        let id = self.key(key)?;
        // SAFETY: the id is valid; the type is checked before the read, and
        // the string lives as long as the context.
        unsafe {
            if sys::gguf_get_kv_type(self.0.as_ptr(), id) != sys::GGUF_TYPE_STRING {
                return None;
            }
            let s = sys::gguf_get_val_str(self.0.as_ptr(), id);
            Some(CStr::from_ptr(s).to_string_lossy().into_owned())
        }
    }

    fn u32(&self, key: &str) -> Option<u32> {
        let id = self.key(key)?;
        // SAFETY: the id is valid and its type checked before the read.
        unsafe {
            (sys::gguf_get_kv_type(self.0.as_ptr(), id) == sys::GGUF_TYPE_UINT32)
                .then(|| sys::gguf_get_val_u32(self.0.as_ptr(), id))
        }
    }

    fn tensor(&self, name: &str) -> Option<TensorInfo> {
        let c_name = CString::new(name).ok()?;
        // SAFETY: a live context; the id is checked before use.
        unsafe {
            let ctx = self.0.as_ptr();
            let id = sys::gguf_find_tensor(ctx, c_name.as_ptr());
            if id < 0 {
                return None;
            }
            Some(TensorInfo {
                ty: sys::gguf_get_tensor_type(ctx, id),
                offset: sys::gguf_get_data_offset(ctx) + sys::gguf_get_tensor_offset(ctx, id),
                size: sys::gguf_get_tensor_size(ctx, id),
            })
        }
    }
}

impl Drop for Gguf {
    fn drop(&mut self) {
        // SAFETY: allocated by gguf_init_from_file, freed once.
        unsafe { sys::gguf_free(self.0.as_ptr()) };
    }
}
