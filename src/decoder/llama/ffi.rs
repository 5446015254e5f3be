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
//! - [`input_width`] and [`architecture`] of a loaded model.
//!
//! Every `unsafe` block is here; the rest of the decoder only sees safe
//! calls. The raw pointers come from the patched `llama-cpp-2` in
//! `vendor/` (`as_ptr` / `as_mut_ptr`).

use std::ffi::{CStr, CString, c_void};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use llama_cpp_2::context::LlamaContext;
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
