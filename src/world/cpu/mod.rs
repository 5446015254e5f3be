//! The world model's forward pass on the CPU, in ndarray: one small struct
//! per layer, each loaded from the checkpoint and applied with `forward`.
//!
//! Matrix products go through ndarray's `matrixmultiply` GEMM; parallelism
//! comes from a rayon pool owned by the backend (row blocks of each GEMM,
//! one task per sequence and head in attention), so the thread count is a
//! per-model setting rather than a process-wide environment variable.
//!
//! One exact shortcut: in the last block only the real (unpadded) positions
//! are needed as queries, because nothing after it reads the padded rows.
//! Keys and values still cover all max_seq positions, since the models were
//! trained to attend over padding.

mod ops;

use std::ops::Range;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use super::checkpoint::Checkpoint;
use super::config::WorldConfig;
use super::error::{Result, WorldError};
use super::vocab::PAD_ID;
use super::{WorldBackend, WorldOutputs};

/// LayerNorm epsilon of the reference implementation.
const LN_EPS: f32 = 1e-5;
/// Below this many rows a GEMM is not worth splitting across threads.
const MIN_ROWS_PER_TASK: usize = 16;

/// The world model on the CPU, with its own thread pool.
pub struct CpuBackend {
    model: Model,
    pool: rayon::ThreadPool,
}

impl CpuBackend {
    /// Loads every tensor of `ckpt` (already resolved into `config`) and
    /// starts a pool of `threads` workers.
    pub fn load(ckpt: &Checkpoint, config: &WorldConfig, threads: usize) -> Result<Self> {
        let model = Model::load(ckpt, config)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tofy-world-{i}"))
            .build()
            .map_err(|e| WorldError::Config {
                path: ckpt.path().to_path_buf(),
                message: format!("cannot start {threads} world-model threads: {e}"),
            })?;
        Ok(Self { model, pool })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

impl WorldBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn forward(&self, batch: &[&[u32]]) -> Result<WorldOutputs> {
        Ok(self.pool.install(|| self.model.forward(batch)))
    }

    fn bridge(&self, latents: ArrayView2<f32>) -> Result<Array2<f32>> {
        Ok(self.pool.install(|| self.model.bridge.forward(latents)))
    }
}

/// The whole network: encoder, transition and bridge.
struct Model {
    encoder: Encoder,
    transition: Transition,
    bridge: Linear,
}

impl Model {
    fn load(ckpt: &Checkpoint, cfg: &WorldConfig) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::load(ckpt, cfg)?,
            transition: Transition::load(ckpt, cfg)?,
            bridge: Linear::load(ckpt, "decoder_bridge.proj", cfg.bridge_dim, cfg.dim)?,
        })
    }

    /// `batch[i]` holds 1..=max_seq token ids.
    fn forward(&self, batch: &[&[u32]]) -> WorldOutputs {
        let state = self.encoder.forward(batch);
        let next = self.transition.forward(state.view());
        let conditioning = self.bridge.forward(next.view());
        WorldOutputs {
            state,
            next,
            conditioning,
        }
    }
}

/// Where each sequence's rows sit in the stacked `[batch·max_seq, dim]` activations.
struct Layout {
    max_seq: usize,
    lens: Vec<usize>,
}

impl Layout {
    /// Row ranges of each sequence's keys: all max_seq positions.
    fn key_rows(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.lens.len()).map(|p| p * self.max_seq..(p + 1) * self.max_seq)
    }

    /// Row ranges of each sequence's queries: every position, or only the
    /// real ones packed one sequence after another (`compact`).
    fn query_rows(&self, compact: bool) -> Vec<Range<usize>> {
        if !compact {
            return self.key_rows().collect();
        }
        let mut start = 0;
        self.lens
            .iter()
            .map(|&len| {
                start += len;
                start - len..start
            })
            .collect()
    }

    /// Copies the real rows of each sequence out of full activations.
    fn gather_real(&self, x: &Array2<f32>) -> Array2<f32> {
        let views: Vec<_> = self
            .key_rows()
            .zip(&self.lens)
            .map(|(rows, &len)| x.slice(s![rows.start..rows.start + len, ..]))
            .collect();
        ndarray::concatenate(Axis(0), &views).expect("row blocks share the width")
    }
}

struct Encoder {
    embed: Array2<f32>,
    positions: Array2<f32>,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
}

impl Encoder {
    fn load(ckpt: &Checkpoint, cfg: &WorldConfig) -> Result<Self> {
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load(ckpt, &format!("encoder.block_{i}"), cfg))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed: ckpt.matrix("encoder.embed.weight", cfg.vocab_size, cfg.dim)?,
            positions: sinusoidal_positions(cfg.max_seq, cfg.dim),
            blocks,
            ln_final: LayerNorm::load(ckpt, "encoder.ln_final", cfg.dim)?,
        })
    }

    /// Pooled state latents, `[batch, dim]`.
    fn forward(&self, batch: &[&[u32]]) -> Array2<f32> {
        let max_seq = self.positions.nrows();
        let layout = Layout {
            max_seq,
            lens: batch.iter().map(|ids| ids.len()).collect(),
        };
        let mut x = Array2::zeros((batch.len() * max_seq, self.embed.ncols()));
        for (seq, (ids, mut rows)) in batch
            .iter()
            .zip(x.axis_chunks_iter_mut(Axis(0), max_seq))
            .enumerate()
        {
            debug_assert!(
                !ids.is_empty() && ids.len() <= max_seq,
                "sequence {seq} has {} ids",
                ids.len()
            );
            for (pos, mut row) in rows.outer_iter_mut().enumerate() {
                let id = ids.get(pos).copied().unwrap_or(PAD_ID) as usize;
                row.assign(&self.embed.row(id));
                row += &self.positions.row(pos);
            }
        }
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, &layout, i == last);
        }
        // `x` now holds only the real rows, one sequence after another.
        let x = self.ln_final.forward(x.view());
        let mut pooled = Array2::zeros((batch.len(), x.ncols()));
        for (rows, mut out) in layout
            .query_rows(true)
            .into_iter()
            .zip(pooled.outer_iter_mut())
        {
            let n = rows.len() as f64;
            for (j, col) in x.slice(s![rows, ..]).columns().into_iter().enumerate() {
                out[j] = (col.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
            }
        }
        pooled
    }
}

/// PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(same), in f64.
pub(crate) fn sinusoidal_positions(max_seq: usize, dim: usize) -> Array2<f32> {
    Array2::from_shape_fn((max_seq, dim), |(pos, j)| {
        let even = (j - j % 2) as f64;
        let angle = pos as f64 / 10000f64.powf(even / dim as f64);
        (if j % 2 == 0 { angle.sin() } else { angle.cos() }) as f32
    })
}

/// Pre-norm transformer block: x + Attn(LN1(x)), then x + FF2(GELU(FF1(LN2(x)))).
struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

impl Block {
    fn load(ckpt: &Checkpoint, prefix: &str, cfg: &WorldConfig) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::load(ckpt, &format!("{prefix}.ln1"), cfg.dim)?,
            attn: Attention::load(ckpt, &format!("{prefix}.attn"), cfg)?,
            ln2: LayerNorm::load(ckpt, &format!("{prefix}.ln2"), cfg.dim)?,
            ff1: Linear::load(ckpt, &format!("{prefix}.ff1"), cfg.ff_dim(), cfg.dim)?,
            ff2: Linear::load(ckpt, &format!("{prefix}.ff2"), cfg.dim, cfg.ff_dim())?,
        })
    }

    /// With `real_only`, returns only the real rows of each sequence (see
    /// the module docs); otherwise all rows.
    fn forward(&self, x: Array2<f32>, layout: &Layout, real_only: bool) -> Array2<f32> {
        let h = self.ln1.forward(x.view());
        let k = self.attn.k_proj.forward(h.view());
        let v = self.attn.v_proj.forward(h.view());
        let (mut x, h) = if real_only {
            (layout.gather_real(&x), layout.gather_real(&h))
        } else {
            (x, h)
        };
        let q = self.attn.q_proj.forward(h.view());
        let context = self
            .attn
            .attend(&q, &k, &v, &layout.query_rows(real_only), layout);
        x += &self.attn.out_proj.forward(context.view());

        let mut hidden = self.ff1.forward(self.ln2.forward(x.view()).view());
        for_row_blocks(hidden.view_mut(), |mut rows| {
            ops::gelu_in_place(
                rows.as_slice_mut()
                    .expect("row blocks of a fresh array are contiguous"),
            )
        });
        x += &self.ff2.forward(hidden.view());
        x
    }
}

/// Multi-head self-attention over all max_seq positions, no mask.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl Attention {
    fn load(ckpt: &Checkpoint, prefix: &str, cfg: &WorldConfig) -> Result<Self> {
        let proj = |name: &str| Linear::load(ckpt, &format!("{prefix}.{name}"), cfg.dim, cfg.dim);
        Ok(Self {
            q_proj: proj("q_proj")?,
            k_proj: proj("k_proj")?,
            v_proj: proj("v_proj")?,
            out_proj: proj("out_proj")?,
            num_heads: cfg.num_heads,
        })
    }

    /// softmax(Q·Kᵀ/√d)·V for each sequence and head; returns the
    /// concatenated heads for the rows of `q`.
    fn attend(
        &self,
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
        query_rows: &[Range<usize>],
        layout: &Layout,
    ) -> Array2<f32> {
        let head_dim = q.ncols() / self.num_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..query_rows.len())
            .flat_map(|seq| (0..self.num_heads).map(move |head| (seq, head)))
            .collect();
        let key_rows: Vec<_> = layout.key_rows().collect();
        let heads: Vec<Array2<f32>> = tasks
            .par_iter()
            .map(|&(seq, head)| {
                let cols = head * head_dim..(head + 1) * head_dim;
                let qh = q.slice(s![query_rows[seq].clone(), cols.clone()]);
                let kh = k.slice(s![key_rows[seq].clone(), cols.clone()]);
                let vh = v.slice(s![key_rows[seq].clone(), cols]);
                let mut scores = qh.dot(&kh.t());
                for mut row in scores.rows_mut() {
                    ops::softmax_in_place(
                        row.as_slice_mut().expect("fresh arrays are contiguous"),
                        scale,
                    );
                }
                scores.dot(&vh)
            })
            .collect();
        let mut context = Array2::zeros(q.raw_dim());
        for (&(seq, head), out) in tasks.iter().zip(heads) {
            let cols = head * head_dim..(head + 1) * head_dim;
            context
                .slice_mut(s![query_rows[seq].clone(), cols])
                .assign(&out);
        }
        context
    }
}

/// Transition for the fixed action "reply": fc2(ReLU(fc1([latent, action]))).
struct Transition {
    action: Array1<f32>,
    fc1: Linear,
    fc2: Linear,
}

impl Transition {
    fn load(ckpt: &Checkpoint, cfg: &WorldConfig) -> Result<Self> {
        let (a, h) = (cfg.action_dim(), cfg.transition_hidden());
        let action = ckpt.matrix("world_transition.action_embed.weight", 1, a)?;
        Ok(Self {
            action: action.row(0).to_owned(),
            fc1: Linear::load(ckpt, "world_transition.fc1", h, cfg.dim + a)?,
            fc2: Linear::load(ckpt, "world_transition.fc2", cfg.dim, h)?,
        })
    }

    fn forward(&self, latent: ArrayView2<f32>) -> Array2<f32> {
        let actions = self
            .action
            .broadcast((latent.nrows(), self.action.len()))
            .expect("row broadcast");
        let input = ndarray::concatenate(Axis(1), &[latent, actions]).expect("same row count");
        let mut hidden = self.fc1.forward(input.view());
        hidden.mapv_inplace(|v| v.max(0.0));
        self.fc2.forward(hidden.view())
    }
}

/// y = x·Wᵀ + b. The checkpoint stores W as `[out, in]`; it is kept here
/// transposed, `[in, out]` row-major, because the GEMM packs its right-hand
/// side on every call and packing contiguous rows is cheaper (measured on
/// the 2-core dev machine, seed size, one thread: batch 1 about 12% faster,
/// batch 8 unchanged).
struct Linear {
    weight_t: Array2<f32>,
    bias: Array1<f32>,
}

impl Linear {
    fn load(ckpt: &Checkpoint, prefix: &str, out: usize, inp: usize) -> Result<Self> {
        let weight = ckpt.matrix(&format!("{prefix}.weight"), out, inp)?;
        Ok(Self {
            weight_t: weight.reversed_axes().as_standard_layout().into_owned(),
            bias: ckpt.vector(&format!("{prefix}.bias"), out)?,
        })
    }

    fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        map_row_blocks(x, self.weight_t.ncols(), |x, mut y| {
            let shape = y.raw_dim();
            y.assign(&self.bias.broadcast(shape).expect("row broadcast"));
            general_mat_mul(1.0, &x, &self.weight_t, 1.0, &mut y);
        })
    }
}

/// LayerNorm over the last axis with biased variance.
struct LayerNorm {
    weight: Array1<f32>,
    bias: Array1<f32>,
}

impl LayerNorm {
    fn load(ckpt: &Checkpoint, prefix: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: ckpt.vector(&format!("{prefix}.weight"), dim)?,
            bias: ckpt.vector(&format!("{prefix}.bias"), dim)?,
        })
    }

    fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        map_row_blocks(x, x.ncols(), |x, mut y| {
            let (w, b) = (
                self.weight.as_slice().unwrap(),
                self.bias.as_slice().unwrap(),
            );
            for (xr, mut yr) in x.rows().into_iter().zip(y.rows_mut()) {
                let out = yr.as_slice_mut().expect("fresh arrays are contiguous");
                ops::layer_norm_row(
                    xr.as_slice().expect("activations are contiguous"),
                    w,
                    b,
                    LN_EPS,
                    out,
                );
            }
        })
    }
}

/// Rows per parallel task for a matrix of `rows` rows on the current pool.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads())
        .max(MIN_ROWS_PER_TASK)
}

/// Computes a `[x.rows, out_cols]` result block by block of rows, in parallel.
fn map_row_blocks<F>(x: ArrayView2<f32>, out_cols: usize, f: F) -> Array2<f32>
where
    F: Fn(ArrayView2<f32>, ArrayViewMut2<f32>) + Sync,
{
    let mut y = Array2::zeros((x.nrows(), out_cols));
    let chunk = rows_per_task(x.nrows());
    if chunk >= x.nrows() {
        f(x, y.view_mut());
        return y;
    }
    let inputs: Vec<_> = x.axis_chunks_iter(Axis(0), chunk).collect();
    let outputs: Vec<_> = y.axis_chunks_iter_mut(Axis(0), chunk).collect();
    inputs
        .into_par_iter()
        .zip(outputs)
        .for_each(|(x, y)| f(x, y));
    y
}

/// Applies `f` to blocks of rows of `x` in place, in parallel.
fn for_row_blocks<F>(mut x: ArrayViewMut2<f32>, f: F)
where
    F: Fn(ArrayViewMut2<f32>) + Sync,
{
    let chunk = rows_per_task(x.nrows());
    if chunk >= x.nrows() {
        return f(x);
    }
    let blocks: Vec<_> = x.axis_chunks_iter_mut(Axis(0), chunk).collect();
    blocks.into_par_iter().for_each(&f);
}
