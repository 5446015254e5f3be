//! The world model in candle: the same network as `world::cpu`, written
//! with candle's autograd tensors so it can be trained, and used as an
//! independent reference for the ndarray forward pass.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::world::WorldConfig;

/// Encoder + transition + bridge, built from a `VarBuilder` whose names are
/// those of the checkpoint format.
pub struct CandleWorld {
    encoder: Encoder,
    transition: Transition,
    bridge: Linear,
}

impl CandleWorld {
    /// Builds (or, for a var map, creates) every tensor under its checkpoint name.
    pub fn new(vb: VarBuilder, cfg: &WorldConfig) -> Result<Self> {
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            transition: Transition::new(vb.pp("world_transition"), cfg)?,
            bridge: candle_nn::linear(cfg.dim, cfg.bridge_dim, vb.pp("decoder_bridge").pp("proj"))?,
        })
    }

    /// Pooled state latents `[N, D]` for ids `[N, max_seq]` (padded) whose
    /// first `lens[i]` positions are real.
    pub fn encode(&self, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        self.encoder.forward(ids, lens)
    }

    /// Predicted next latents `[N, D]` for the fixed action "reply".
    pub fn transition(&self, latent: &Tensor) -> Result<Tensor> {
        self.transition.forward(latent)
    }

    /// Conditioning vectors `[N, B]`.
    pub fn forward(&self, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let next = self.transition(&self.encode(ids, lens)?)?;
        self.bridge.forward(&next)
    }
}

/// Pads id lists to `[N, max_seq]` (with `<pad>` = 0) as a u32 tensor.
pub fn pad_ids(batch: &[&[u32]], max_seq: usize, device: &Device) -> Result<Tensor> {
    let mut flat = vec![0u32; batch.len() * max_seq];
    for (row, ids) in flat.chunks_mut(max_seq).zip(batch) {
        let n = ids.len().min(max_seq);
        row[..n].copy_from_slice(&ids[..n]);
    }
    Tensor::from_vec(flat, (batch.len(), max_seq), device)
}

/// The encoder: embedding + sinusoidal positions, pre-norm blocks, final
/// LayerNorm, mean over the real positions.
pub(crate) struct Encoder {
    embed: Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
}

impl Encoder {
    pub(crate) fn new(vb: VarBuilder, cfg: &WorldConfig) -> Result<Self> {
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(vb.pp(format!("block_{i}")), cfg))
            .collect::<Result<_>>()?;
        let table: Vec<f32> = (0..cfg.max_seq)
            .flat_map(|pos| {
                (0..cfg.dim).map(move |j| {
                    let angle = pos as f64 / 10000f64.powf((j - j % 2) as f64 / cfg.dim as f64);
                    (if j % 2 == 0 { angle.sin() } else { angle.cos() }) as f32
                })
            })
            .collect();
        Ok(Self {
            embed: candle_nn::embedding(cfg.vocab_size, cfg.dim, vb.pp("embed"))?,
            positions: Tensor::from_vec(table, (cfg.max_seq, cfg.dim), vb.device())?,
            blocks,
            ln_final: layer_norm(cfg.dim, vb.pp("ln_final"))?,
        })
    }

    pub(crate) fn forward(&self, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (n, t) = ids.dims2()?;
        let mut x = self.embed.forward(ids)?.broadcast_add(&self.positions)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = self.ln_final.forward(&x)?;
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&len| (0..t).map(move |pos| if pos < len { 1.0 / len as f32 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, t, 1), x.device())?;
        x.broadcast_mul(&mask)?.sum(1)
    }
}

/// LayerNorm from plain tensor ops. candle-nn's `LayerNorm` runs a fused
/// kernel that has no backward pass: gradients silently stop there, and
/// with it the encoder never trained (only the transition did).
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

const LN_EPS: f64 = 1e-5;

fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
    })
}

struct Block {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &WorldConfig) -> Result<Self> {
        Ok(Self {
            ln1: layer_norm(cfg.dim, vb.pp("ln1"))?,
            attn: Attention::new(vb.pp("attn"), cfg)?,
            ln2: layer_norm(cfg.dim, vb.pp("ln2"))?,
            ff1: candle_nn::linear(cfg.dim, cfg.ff_dim(), vb.pp("ff1"))?,
            ff2: candle_nn::linear(cfg.ff_dim(), cfg.dim, vb.pp("ff2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?)?)?;
        let hidden = self.ff1.forward(&self.ln2.forward(&x)?)?.gelu()?; // tanh approximation
        x + self.ff2.forward(&hidden)?
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &WorldConfig) -> Result<Self> {
        let proj = |name: &str| candle_nn::linear(cfg.dim, cfg.dim, vb.pp(name));
        Ok(Self {
            q_proj: proj("q_proj")?,
            k_proj: proj("k_proj")?,
            v_proj: proj("v_proj")?,
            out_proj: proj("out_proj")?,
            num_heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        let head_dim = d / self.num_heads;
        let heads = |proj: &Linear| -> Result<Tensor> {
            proj.forward(x)?
                .reshape((n, t, self.num_heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (
            heads(&self.q_proj)?,
            heads(&self.k_proj)?,
            heads(&self.v_proj)?,
        );
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (head_dim as f64).sqrt())?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((n, t, d))?;
        self.out_proj.forward(&context)
    }
}

struct Transition {
    action: Tensor,
    fc1: Linear,
    fc2: Linear,
}

impl Transition {
    fn new(vb: VarBuilder, cfg: &WorldConfig) -> Result<Self> {
        let a = cfg.action_dim();
        Ok(Self {
            action: vb.pp("action_embed").get((1, a), "weight")?,
            fc1: candle_nn::linear(cfg.dim + a, cfg.transition_hidden(), vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.transition_hidden(), cfg.dim, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let n = latent.dim(0)?;
        let action = self.action.broadcast_as((n, self.action.dim(1)?))?;
        let input = Tensor::cat(&[latent, &action], 1)?;
        self.fc2.forward(&self.fc1.forward(&input)?.relu()?)
    }
}

/// Loads a checkpoint into candle tensors on the CPU, for reference runs.
pub fn load_checkpoint(path: &std::path::Path, cfg: &WorldConfig) -> Result<CandleWorld> {
    // SAFETY: read-only map of a file nobody modifies during the run.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu)? };
    CandleWorld::new(vb, cfg)
}
