//! The world model on an NVIDIA GPU: the same forward pass as [`super::cpu`],
//! with cuBLAS for the GEMMs and our own kernels (`kernels.cu`, compiled by
//! NVRTC at load: [`compile`]) for everything else.
//!
//! Everything is loaded at run time through cudarc (driver, NVRTC, cuBLAS),
//! so a `cuda` build starts on a machine without them: [`probe`] looks for
//! the driver without the panic cudarc gives when it is missing, and the
//! caller falls back to the CPU.
//!
//! Layout of one forward pass over `b` prompts, every prompt padded to
//! max_seq rows (the attention reads all of them, as the spec fixes it):
//! embed → per block [LN1 → QKV GEMM → attention → out GEMM added into x →
//! LN2 → FF1 GEMM → bias+GELU → FF2 GEMM added into x] → LN → mean-pool →
//! transition → bridge. Two fusions save launches without changing the
//! arithmetic: a GEMM that adds into the residual stream leaves its bias to
//! the LayerNorm that reads the stream next, and the attention kernel adds
//! the Q/K/V biases as it reads them. The transition's fixed action is folded
//! into fc1's bias at load (fc1([x, a]) = W_x·x + (W_a·a + b)).
//!
//! Weights and activation buffers (sized for [`MAX_BATCH`] prompts) are
//! allocated once. The launches of a forward pass for a batch size are
//! captured once into a CUDA graph and replayed (`TOFY_CUDA_GRAPHS=0` runs
//! them one by one instead); a capture that fails turns graphs off for the
//! process and says so once on stderr.

pub mod compile;

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use ndarray::{Array2, ArrayView2, s};
use parking_lot::Mutex;

use super::checkpoint::Checkpoint;
use super::config::WorldConfig;
use super::cpu::sinusoidal_positions;
use super::error::{Result, WorldError};
use super::vocab::PAD_ID;
use super::{MAX_BATCH, WorldBackend, WorldOutputs};

/// LayerNorm epsilon of the reference implementation.
const LN_EPS: f32 = 1e-5;
/// Threads per block of every kernel (a multiple of the warp size).
const BLOCK: u32 = 128;
/// `bias_act`'s activations (kernels.cu).
const ACT_NONE: i32 = 0;
const ACT_GELU: i32 = 1;
const ACT_RELU: i32 = 2;
/// cuBLAS's workspace, given up front: cuBLAS must not allocate while a
/// graph is being captured (32 MiB is NVIDIA's advice for Hopper).
const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Shared memory a block may use without opting in.
const MAX_SHARED: usize = 48 << 10;

/// A GPU the world model can run on.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability, `(major, minor)`.
    pub compute: (i32, i32),
    pub memory_bytes: usize,
    /// The driver's CUDA version, `(major, minor)`.
    pub driver: (i32, i32),
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {:.0} GiB; driver CUDA {}.{})",
            self.ordinal,
            self.name,
            self.compute.0,
            self.compute.1,
            self.memory_bytes as f64 / f64::from(1 << 30),
            self.driver.0,
            self.driver.1
        )
    }
}

/// Whether libcuda (the NVIDIA driver) can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: dlopens the candidate names, resolving nothing.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// GPU `ordinal`, if the driver is there and sees it. Never panics: the
/// error says what is missing.
pub fn probe(ordinal: usize) -> std::result::Result<GpuInfo, String> {
    open(ordinal).map(|(_, info)| info)
}

/// GPU `ordinal`'s context and what it is. The backend keeps the context:
/// letting it go would release the primary context, and the load would
/// create it again.
fn open(ordinal: usize) -> std::result::Result<(Arc<CudaContext>, GpuInfo), String> {
    if !driver_present() {
        return Err("no NVIDIA driver (libcuda.so.1 not found)".to_string());
    }
    guarded(
        || {
            let count = CudaContext::device_count().map_err(|e| e.to_string())?;
            let count = usize::try_from(count).unwrap_or(0);
            if ordinal >= count {
                return Err(format!(
                    "cuda:{ordinal} asked for, but the driver sees {count} GPU(s)"
                ));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| e.to_string())?;
            let mut version = 0;
            // SAFETY: one out-parameter, written by the call.
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
                .result()
                .map_err(|e| e.to_string())?;
            let info = GpuInfo {
                ordinal,
                name: ctx.name().map_err(|e| e.to_string())?,
                compute: ctx.compute_capability().map_err(|e| e.to_string())?,
                memory_bytes: ctx.total_mem().map_err(|e| e.to_string())?,
                driver: (version / 1000, version % 1000 / 10),
            };
            Ok((ctx, info))
        },
        |panic| panic,
    )
}

/// Runs `f`, turning a cudarc panic (a library or a symbol missing from an
/// old driver) into the error `on_panic` makes of its message.
fn guarded<T, E>(
    f: impl FnOnce() -> std::result::Result<T, E>,
    on_panic: impl FnOnce(String) -> E,
) -> std::result::Result<T, E> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(on_panic(format!("the CUDA libraries failed: {text}")))
    })
}

fn cuda_err(e: impl std::fmt::Display) -> WorldError {
    WorldError::Cuda {
        message: e.to_string(),
    }
}

/// The world model on one GPU.
pub struct CudaBackend {
    /// Held for a whole forward pass: the activation buffers are shared.
    /// (Declared first so that the graphs go before the memory they name.)
    runs: Mutex<Runs>,
    gpu: Gpu,
    info: GpuInfo,
}

/// How forward passes are launched.
struct Runs {
    /// One captured forward pass per batch size.
    graphs: HashMap<usize, CudaGraph>,
    /// Batch sizes that ran once uncaptured (see [`CudaBackend::launch`]).
    warmed: HashSet<usize>,
    use_graphs: bool,
}

// SAFETY: a CudaGraph holds raw CUDA handles, which CUDA lets any thread use
// as long as no two use one at once; Runs lives behind the backend's mutex.
unsafe impl Send for Runs {}

impl CudaBackend {
    /// Uploads every tensor of `ckpt` (already resolved into `config`) to
    /// GPU `ordinal` and compiles the kernels for it.
    pub fn load(ckpt: &Checkpoint, config: &WorldConfig, ordinal: usize) -> Result<Self> {
        let (ctx, info) = open(ordinal).map_err(|message| WorldError::Cuda { message })?;
        for (present, lib) in [
            (compile::nvrtc_present(), "libnvrtc.so.13 (NVRTC)"),
            // SAFETY: dlopens the candidate names, resolving nothing.
            (
                unsafe { cudarc::cublas::sys::is_culib_present() },
                "libcublas.so.13 (cuBLAS)",
            ),
        ] {
            if !present {
                return Err(WorldError::Cuda {
                    message: format!(
                        "{lib} not found: install the CUDA 13 toolkit, or put its lib/ on LD_LIBRARY_PATH"
                    ),
                });
            }
        }
        let nvrtc = compile::nvrtc_version().map_err(|message| WorldError::Cuda { message })?;
        if info.driver < nvrtc {
            return Err(WorldError::Cuda {
                message: format!(
                    "the NVIDIA driver supports CUDA {}.{}, older than NVRTC {}.{}, whose kernels it cannot load: update the driver, or put an NVRTC of at most {}.{} first on LD_LIBRARY_PATH",
                    info.driver.0, info.driver.1, nvrtc.0, nvrtc.1, info.driver.0, info.driver.1
                ),
            });
        }
        let gpu = guarded(
            || Gpu::load(ctx, ckpt, config, &info),
            |message| WorldError::Cuda { message },
        )?;
        let use_graphs = std::env::var("TOFY_CUDA_GRAPHS").map_or(true, |v| v != "0");
        Ok(Self {
            runs: Mutex::new(Runs {
                graphs: HashMap::new(),
                warmed: HashSet::new(),
                use_graphs,
            }),
            gpu,
            info,
        })
    }

    /// The GPU this backend runs on.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Runs the forward pass for the `b` prompts already uploaded, as a
    /// graph when possible.
    fn launch(&self, runs: &mut Runs, b: usize) -> Result<()> {
        if runs.use_graphs && !runs.graphs.contains_key(&b) {
            // The first pass at a batch size runs uncaptured: it loads our
            // kernels and cuBLAS's (lazily loaded) code for these shapes
            // outside any capture. The second is captured.
            if runs.warmed.insert(b) {
                return self.gpu.enqueue_forward(b);
            }
            match self.gpu.capture(b) {
                Ok(graph) => {
                    runs.graphs.insert(b, graph);
                }
                Err(err) => {
                    eprintln!(
                        "note: CUDA graph capture failed ({err}); the world model launches its kernels one by one"
                    );
                    runs.use_graphs = false;
                }
            }
        }
        match runs.graphs.get(&b) {
            Some(graph) if runs.use_graphs => graph.launch().map_err(cuda_err),
            _ => self.gpu.enqueue_forward(b),
        }
    }
}

impl Drop for CudaBackend {
    /// The fields free device memory and the cuBLAS handle, which needs the
    /// context current on the dropping thread.
    fn drop(&mut self) {
        let _ = self.gpu.bind();
    }
}

impl WorldBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn forward(&self, batch: &[&[u32]]) -> Result<WorldOutputs> {
        let gpu = &self.gpu;
        let (b, max_seq) = (batch.len(), gpu.cfg.max_seq);
        assert!(
            (1..=MAX_BATCH).contains(&b),
            "WorldModel::forward splits batches into at most {MAX_BATCH}"
        );
        let mut ids = vec![PAD_ID; b * max_seq];
        let mut lens = Vec::with_capacity(b);
        for (rows, seq) in ids.chunks_mut(max_seq).zip(batch) {
            rows[..seq.len()].copy_from_slice(seq);
            lens.push(seq.len() as i32);
        }
        let mut runs = self.runs.lock();
        gpu.bind()?;
        gpu.upload(&gpu.buffers.ids, &ids)?;
        gpu.upload(&gpu.buffers.lens, &lens)?;
        self.launch(&mut runs, b)?;
        let (d, bridge) = (gpu.cfg.dim, gpu.cfg.bridge_dim);
        let state = gpu.download(&gpu.buffers.state, b, d)?;
        let next = gpu.download(&gpu.buffers.next, b, d)?;
        let conditioning = gpu.download(&gpu.buffers.cond, b, bridge)?;
        gpu.stream.synchronize().map_err(cuda_err)?;
        Ok(WorldOutputs {
            state: state.into_array(),
            next: next.into_array(),
            conditioning: conditioning.into_array(),
        })
    }

    fn bridge(&self, latents: ArrayView2<f32>) -> Result<Array2<f32>> {
        let gpu = &self.gpu;
        let (d, bridge) = (gpu.cfg.dim, gpu.cfg.bridge_dim);
        // The upload below must not overrun the `next` buffer.
        assert_eq!(latents.ncols(), d, "bridge input of the model's width");
        let mut out = Array2::zeros((latents.nrows(), bridge));
        let _runs = self.runs.lock();
        gpu.bind()?;
        for start in (0..latents.nrows()).step_by(MAX_BATCH) {
            let rows = (latents.nrows() - start).min(MAX_BATCH);
            let block = latents.slice(s![start..start + rows, ..]);
            let host: Vec<f32> = block.iter().copied().collect();
            gpu.upload(&gpu.buffers.next, &host)?;
            gpu.enqueue_bridge(rows)?;
            let got = gpu.download(&gpu.buffers.cond, rows, bridge)?;
            gpu.stream.synchronize().map_err(cuda_err)?;
            out.slice_mut(s![start..start + rows, ..])
                .assign(&got.into_array());
        }
        Ok(out)
    }
}

/// A device allocation and its address, which the kernels and cuBLAS take
/// raw. The slice owns the memory for as long as the backend lives.
struct Buf<T> {
    _slice: CudaSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr> Buf<T> {
    fn new(stream: &Arc<CudaStream>, slice: CudaSlice<T>) -> Self {
        // The returned guard records an event only under cudarc's
        // multi-stream tracking, which `Gpu::load` turns off.
        let ptr = slice.device_ptr(stream).0;
        Self { _slice: slice, ptr }
    }
}

/// A device-to-host copy in flight: read it after the stream synchronises.
struct Download {
    host: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Download {
    fn into_array(self) -> Array2<f32> {
        Array2::from_shape_vec((self.rows, self.cols), self.host).expect("rows × cols values")
    }
}

struct Kernels {
    _module: Arc<CudaModule>,
    embed: CudaFunction,
    layer_norm: CudaFunction,
    attention: CudaFunction,
    bias_act: CudaFunction,
    mean_pool: CudaFunction,
}

struct Block {
    ln1: (Buf<f32>, Buf<f32>),
    /// q, k and v stacked: `[3·dim, dim]`, and their biases.
    qkv: (Buf<f32>, Buf<f32>),
    out: (Buf<f32>, Buf<f32>),
    ln2: (Buf<f32>, Buf<f32>),
    ff1: (Buf<f32>, Buf<f32>),
    ff2: (Buf<f32>, Buf<f32>),
}

struct Weights {
    embed: Buf<f32>,
    positions: Buf<f32>,
    blocks: Vec<Block>,
    ln_final: (Buf<f32>, Buf<f32>),
    /// fc1's latent columns `[hidden, dim]`, and its bias with the action folded in.
    fc1: (Buf<f32>, Buf<f32>),
    fc2: (Buf<f32>, Buf<f32>),
    bridge: (Buf<f32>, Buf<f32>),
}

/// Activations for up to MAX_BATCH prompts.
struct Buffers {
    ids: Buf<u32>,
    lens: Buf<i32>,
    /// The residual stream `[b·max_seq, dim]`.
    x: Buf<f32>,
    /// LayerNorm outputs `[b·max_seq, dim]`.
    h: Buf<f32>,
    qkv: Buf<f32>,
    context: Buf<f32>,
    ff: Buf<f32>,
    state: Buf<f32>,
    hidden: Buf<f32>,
    next: Buf<f32>,
    cond: Buf<f32>,
}

/// Everything on the device, immutable once loaded.
struct Gpu {
    cfg: WorldConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    weights: Weights,
    buffers: Buffers,
    /// Owned for cuBLAS's lifetime (see [`CUBLAS_WORKSPACE`]).
    _workspace: Buf<u8>,
}

impl Gpu {
    fn load(
        ctx: Arc<CudaContext>,
        ckpt: &Checkpoint,
        cfg: &WorldConfig,
        info: &GpuInfo,
    ) -> Result<Self> {
        // The dynamic part, plus the kernel's static reduction scratch.
        let attention_shared = attention_shared_bytes(cfg) + 32 * std::mem::size_of::<f32>();
        if attention_shared > MAX_SHARED {
            return Err(WorldError::Cuda {
                message: format!(
                    "max_seq {} with head size {} needs {attention_shared} bytes of shared memory per attention block, over the {MAX_SHARED} the kernel may use; run this model with --device cpu",
                    cfg.max_seq,
                    cfg.head_dim()
                ),
            });
        }
        // SAFETY: all work goes to the one stream below, in order, so there
        // is nothing for cudarc's cross-stream events to order (and those
        // events cannot be recorded while a graph is being captured).
        unsafe { ctx.disable_event_tracking() };
        // Not the legacy default stream: that one cannot be captured.
        let stream = ctx.new_stream().map_err(cuda_err)?;
        let ptx = compile::ptx_for(info.compute.0, info.compute.1)
            .map_err(|message| WorldError::Cuda { message })?;
        let module = ctx.load_module(ptx).map_err(cuda_err)?;
        let function = |name| module.load_function(name).map_err(cuda_err);
        let kernels = Kernels {
            embed: function("embed")?,
            layer_norm: function("layer_norm")?,
            attention: function("attention")?,
            bias_act: function("bias_act")?,
            mean_pool: function("mean_pool")?,
            _module: module.clone(),
        };
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err)?;
        let workspace = Buf::new(
            &stream,
            stream
                .alloc_zeros::<u8>(CUBLAS_WORKSPACE)
                .map_err(cuda_err)?,
        );
        // SAFETY: the workspace outlives the handle (both are fields of Gpu,
        // and the handle is only used through it).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr as *mut std::ffi::c_void,
                CUBLAS_WORKSPACE,
            )
        }
        .result()
        .map_err(cuda_err)?;
        let weights = Weights::load(&stream, ckpt, cfg)?;
        let buffers = Buffers::new(&stream, cfg)?;
        Ok(Self {
            cfg: *cfg,
            ctx,
            stream,
            blas,
            kernels,
            weights,
            buffers,
            _workspace: workspace,
        })
    }

    /// Makes the context current on this thread (the raw copies need it).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda_err)
    }

    fn upload<T: DeviceRepr>(&self, dst: &Buf<T>, host: &[T]) -> Result<()> {
        // SAFETY: `dst` holds at least as many elements (MAX_BATCH-sized
        // buffers, callers bound the batch); the copy is ordered on the stream.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr, host, self.stream.cu_stream()) }
            .map_err(cuda_err)
    }

    fn download(&self, src: &Buf<f32>, rows: usize, cols: usize) -> Result<Download> {
        let mut host = vec![0.0f32; rows * cols];
        // SAFETY: `src` holds at least rows × cols values; the host vector is
        // read only after the caller synchronises the stream.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host, src.ptr, self.stream.cu_stream())
        }
        .map_err(cuda_err)?;
        Ok(Download { host, rows, cols })
    }

    /// Captures [`Gpu::enqueue_forward`] for `b` prompts as a graph.
    fn capture(&self, b: usize) -> Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err)?;
        let enqueued = self.enqueue_forward(b);
        // Always end the capture, so the stream is usable whatever happened.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        enqueued?;
        let graph = graph.map_err(cuda_err)?.ok_or_else(|| WorldError::Cuda {
            message: "the captured graph is empty".into(),
        })?;
        graph.upload().map_err(cuda_err)?;
        Ok(graph)
    }

    /// Enqueues the whole forward pass for the `b` prompts in `ids`/`lens`.
    fn enqueue_forward(&self, b: usize) -> Result<()> {
        let (cfg, w, buf) = (&self.cfg, &self.weights, &self.buffers);
        let (d, seq) = (cfg.dim, cfg.max_seq);
        let rows = b * seq;
        let (dim_arg, seq_arg) = (d as i32, seq as i32);
        // SAFETY: embed(ids, table, positions, x, max_seq, dim) over `rows`
        // rows; ids holds `rows` ids below the table's vocab_size rows.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.embed)
                .arg(&buf.ids.ptr)
                .arg(&w.embed.ptr)
                .arg(&w.positions.ptr)
                .arg(&buf.x.ptr)
                .arg(&seq_arg)
                .arg(&dim_arg)
                .launch(LaunchConfig::for_rows(rows))
        }
        .map_err(cuda_err)?;
        let mut pending = 0u64; // no bias waits to be added into x yet
        for block in &w.blocks {
            self.layer_norm(rows, pending, &block.ln1, buf.h.ptr)?;
            self.gemm(
                buf.h.ptr,
                block.qkv.0.ptr,
                buf.qkv.ptr,
                rows,
                3 * d,
                d,
                false,
            )?;
            self.attention(b, block.qkv.1.ptr)?;
            self.gemm(
                buf.context.ptr,
                block.out.0.ptr,
                buf.x.ptr,
                rows,
                d,
                d,
                true,
            )?;
            self.layer_norm(rows, block.out.1.ptr, &block.ln2, buf.h.ptr)?;
            let ff = cfg.ff_dim();
            self.gemm(buf.h.ptr, block.ff1.0.ptr, buf.ff.ptr, rows, ff, d, false)?;
            self.bias_act(buf.ff.ptr, block.ff1.1.ptr, rows, ff, ACT_GELU)?;
            self.gemm(buf.ff.ptr, block.ff2.0.ptr, buf.x.ptr, rows, d, ff, true)?;
            pending = block.ff2.1.ptr;
        }
        self.layer_norm(rows, pending, &w.ln_final, buf.h.ptr)?;
        let cfg_pool = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: mean_pool(x, lens, out, max_seq, dim) over b sequences; the
        // buffers hold b·max_seq·dim, b and b·dim values.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.mean_pool)
                .arg(&buf.h.ptr)
                .arg(&buf.lens.ptr)
                .arg(&buf.state.ptr)
                .arg(&seq_arg)
                .arg(&dim_arg)
                .launch(cfg_pool)
        }
        .map_err(cuda_err)?;
        let hidden = cfg.transition_hidden();
        self.gemm(
            buf.state.ptr,
            w.fc1.0.ptr,
            buf.hidden.ptr,
            b,
            hidden,
            d,
            false,
        )?;
        self.bias_act(buf.hidden.ptr, w.fc1.1.ptr, b, hidden, ACT_RELU)?;
        self.gemm(
            buf.hidden.ptr,
            w.fc2.0.ptr,
            buf.next.ptr,
            b,
            d,
            hidden,
            false,
        )?;
        self.bias_act(buf.next.ptr, w.fc2.1.ptr, b, d, ACT_NONE)?;
        self.enqueue_bridge(b)
    }

    /// cond = bridge(next) for `rows` rows.
    fn enqueue_bridge(&self, rows: usize) -> Result<()> {
        let (w, buf) = (&self.weights, &self.buffers);
        let (d, out) = (self.cfg.dim, self.cfg.bridge_dim);
        self.gemm(
            buf.next.ptr,
            w.bridge.0.ptr,
            buf.cond.ptr,
            rows,
            out,
            d,
            false,
        )?;
        self.bias_act(buf.cond.ptr, w.bridge.1.ptr, rows, out, ACT_NONE)
    }

    /// out = LayerNorm(x + pending) row by row, `pending` (a bias, or 0 for
    /// none) also written back into x.
    fn layer_norm(
        &self,
        rows: usize,
        pending: u64,
        (weight, bias): &(Buf<f32>, Buf<f32>),
        out: u64,
    ) -> Result<()> {
        let (dim, eps) = (self.cfg.dim as i32, LN_EPS);
        // SAFETY: layer_norm(x, pending, weight, bias, out, dim, eps) over
        // `rows` rows of x and out; pending is null or `dim` values.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.layer_norm)
                .arg(&self.buffers.x.ptr)
                .arg(&pending)
                .arg(&weight.ptr)
                .arg(&bias.ptr)
                .arg(&out)
                .arg(&dim)
                .arg(&eps)
                .launch(LaunchConfig::for_rows(rows))
        }
        .map(drop)
        .map_err(cuda_err)
    }

    /// context = attention(qkv + bias) for `b` prompts.
    fn attention(&self, b: usize, qkv_bias: u64) -> Result<()> {
        let cfg = &self.cfg;
        let head_dim = cfg.head_dim();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (seq, dim, hd) = (cfg.max_seq as i32, cfg.dim as i32, head_dim as i32);
        let launch = LaunchConfig {
            grid_dim: (cfg.max_seq as u32, cfg.num_heads as u32, b as u32),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: attention_shared_bytes(cfg) as u32,
        };
        // SAFETY: attention(qkv, bqkv, out, max_seq, dim, head_dim, scale):
        // qkv holds b·max_seq rows of 3·dim, out b·max_seq rows of dim; the
        // shared memory is sized by attention_shared_bytes.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.attention)
                .arg(&self.buffers.qkv.ptr)
                .arg(&qkv_bias)
                .arg(&self.buffers.context.ptr)
                .arg(&seq)
                .arg(&dim)
                .arg(&hd)
                .arg(&scale)
                .launch(launch)
        }
        .map(drop)
        .map_err(cuda_err)
    }

    /// y = act(y + bias) over `rows × cols` values.
    fn bias_act(&self, y: u64, bias: u64, rows: usize, cols: usize, act: i32) -> Result<()> {
        let blocks = (rows * cols).div_ceil(BLOCK as usize).min(4096) as u32;
        let (total, cols) = ((rows * cols) as i64, cols as i32);
        let launch = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bias_act(y, bias, cols, total, act): y holds `total`
        // values and bias `cols`.
        unsafe {
            self.stream
                .launch_builder(&self.kernels.bias_act)
                .arg(&y)
                .arg(&bias)
                .arg(&cols)
                .arg(&total)
                .arg(&act)
                .launch(launch)
        }
        .map(drop)
        .map_err(cuda_err)
    }

    /// Row-major `y[m, n] = x[m, k] · w[n, k]ᵀ` (`+ y` with `accumulate`),
    /// the checkpoint's `[out, in]` weights as they are. cuBLAS is
    /// column-major, so it computes yᵀ = w · xᵀ: w read transposed.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let (m, n, k) = (m as i32, n as i32, k as i32);
        // SAFETY: x holds m·k values, w n·k and y m·n, all on this stream's
        // device; alpha and beta are read during the call.
        unsafe {
            cudarc::cublas::result::sgemm(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                &alpha,
                w as *const f32,
                k,
                x as *const f32,
                k,
                &beta,
                y as *mut f32,
                n,
            )
        }
        .map_err(cuda_err)
    }
}

/// Shared memory of one attention block: q, the scores, and one partial
/// output per warp (kernels.cu).
fn attention_shared_bytes(cfg: &WorldConfig) -> usize {
    let warps = (BLOCK / 32) as usize;
    (cfg.head_dim() * (1 + warps) + cfg.max_seq) * std::mem::size_of::<f32>()
}

trait ForRows {
    fn for_rows(rows: usize) -> Self;
}

impl ForRows for LaunchConfig {
    /// One block of [`BLOCK`] threads per row.
    fn for_rows(rows: usize) -> Self {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

impl Weights {
    fn load(stream: &Arc<CudaStream>, ckpt: &Checkpoint, cfg: &WorldConfig) -> Result<Self> {
        let up = |values: &[f32]| -> Result<Buf<f32>> {
            Ok(Buf::new(
                stream,
                stream.clone_htod(values).map_err(cuda_err)?,
            ))
        };
        let matrix = |name: &str, rows, cols| -> Result<Buf<f32>> {
            let m = ckpt.matrix(name, rows, cols)?;
            up(m.as_standard_layout().as_slice().expect("standard layout"))
        };
        let vector = |name: &str, len| -> Result<Buf<f32>> {
            up(ckpt.vector(name, len)?.as_slice().expect("contiguous"))
        };
        let linear = |prefix: &str, out, inp| -> Result<(Buf<f32>, Buf<f32>)> {
            Ok((
                matrix(&format!("{prefix}.weight"), out, inp)?,
                vector(&format!("{prefix}.bias"), out)?,
            ))
        };
        let norm = |prefix: &str| -> Result<(Buf<f32>, Buf<f32>)> {
            Ok((
                vector(&format!("{prefix}.weight"), cfg.dim)?,
                vector(&format!("{prefix}.bias"), cfg.dim)?,
            ))
        };
        let d = cfg.dim;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block_{i}");
            let mut qkv_w = Vec::with_capacity(3 * d * d);
            let mut qkv_b = Vec::with_capacity(3 * d);
            for name in ["q_proj", "k_proj", "v_proj"] {
                let w = ckpt.matrix(&format!("{p}.attn.{name}.weight"), d, d)?;
                qkv_w.extend(w.iter());
                qkv_b.extend(ckpt.vector(&format!("{p}.attn.{name}.bias"), d)?.iter());
            }
            blocks.push(Block {
                ln1: norm(&format!("{p}.ln1"))?,
                qkv: (up(&qkv_w)?, up(&qkv_b)?),
                out: linear(&format!("{p}.attn.out_proj"), d, d)?,
                ln2: norm(&format!("{p}.ln2"))?,
                ff1: linear(&format!("{p}.ff1"), cfg.ff_dim(), d)?,
                ff2: linear(&format!("{p}.ff2"), d, cfg.ff_dim())?,
            });
        }
        let positions = sinusoidal_positions(cfg.max_seq, d);
        let (a, hidden) = (cfg.action_dim(), cfg.transition_hidden());
        let fc1 = ckpt.matrix("world_transition.fc1.weight", hidden, d + a)?;
        let fc1_bias = ckpt.vector("world_transition.fc1.bias", hidden)?;
        let action = ckpt.matrix("world_transition.action_embed.weight", 1, a)?;
        let folded_bias: Vec<f32> = (0..hidden)
            .map(|i| {
                let dot: f64 = (0..a)
                    .map(|j| f64::from(fc1[[i, d + j]]) * f64::from(action[[0, j]]))
                    .sum();
                (f64::from(fc1_bias[i]) + dot) as f32
            })
            .collect();
        let fc1_latent = fc1.slice(s![.., ..d]).as_standard_layout().into_owned();
        Ok(Self {
            embed: matrix("encoder.embed.weight", cfg.vocab_size, d)?,
            positions: up(positions.as_slice().expect("fresh array"))?,
            blocks,
            ln_final: norm("encoder.ln_final")?,
            fc1: (
                up(fc1_latent.as_slice().expect("standard layout"))?,
                up(&folded_bias)?,
            ),
            fc2: linear("world_transition.fc2", d, hidden)?,
            bridge: linear("decoder_bridge.proj", cfg.bridge_dim, d)?,
        })
    }
}

impl Buffers {
    fn new(stream: &Arc<CudaStream>, cfg: &WorldConfig) -> Result<Self> {
        let rows = MAX_BATCH * cfg.max_seq;
        let f32s = |n: usize| -> Result<Buf<f32>> {
            Ok(Buf::new(
                stream,
                stream.alloc_zeros::<f32>(n).map_err(cuda_err)?,
            ))
        };
        Ok(Self {
            ids: Buf::new(stream, stream.alloc_zeros::<u32>(rows).map_err(cuda_err)?),
            lens: Buf::new(
                stream,
                stream.alloc_zeros::<i32>(MAX_BATCH).map_err(cuda_err)?,
            ),
            x: f32s(rows * cfg.dim)?,
            h: f32s(rows * cfg.dim)?,
            qkv: f32s(rows * 3 * cfg.dim)?,
            context: f32s(rows * cfg.dim)?,
            ff: f32s(rows * cfg.ff_dim())?,
            state: f32s(MAX_BATCH * cfg.dim)?,
            hidden: f32s(MAX_BATCH * cfg.transition_hidden())?,
            next: f32s(MAX_BATCH * cfg.dim)?,
            cond: f32s(MAX_BATCH * cfg.bridge_dim)?,
        })
    }
}
