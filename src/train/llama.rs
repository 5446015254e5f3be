//! A frozen Llama in candle with a gradient to its *inputs*: the decoder
//! that `tofy train-projector` back-propagates through.
//!
//! llama.cpp evaluates the model but has no backward pass, and
//! candle-transformers' `quantized_llama` runs fused kernels with none
//! either. This is the same network (RMSNorm, RoPE on adjacent pairs as
//! llama.cpp's `LLAMA_ROPE_TYPE_NORM`, grouped-query attention, SwiGLU)
//! over the GGUF's weights dequantized to f32, written with plain tensor ops
//! so that autograd reaches the embedding rows fed in. The weights are
//! constants: their products go through `FrozenLinear`, whose backward
//! pass computes the input's gradient alone (candle's matmul would also
//! compute the weight's, a third of the work, only to drop it).
//!
//! It is checked against llama.cpp's own scores (tests/train_projector.rs).
//! On the GGUF's weights dequantised to an F32 GGUF and an f16 KV cache the
//! two agree to hundredths of a nat per token at most (0.016 on the test's
//! six replies). On the Q4_1 GGUF itself llama.cpp multiplies quantised
//! weights by activations it quantises to 8 bits, and by default keeps
//! 8-bit keys and values, so single tokens move by tenths of a nat (0.29 on
//! the same replies) and a reply's mean by hundredths (0.074): noise of
//! llama.cpp's arithmetic, not a different network.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{CpuStorage, D, DType, Device, Layout, Result, Shape, Tensor};

/// What the forward pass needs beyond the weights' own shapes (layer count,
/// vocabulary and feed-forward width come from the tensors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaShape {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub rms_eps: f64,
    pub rope_base: f64,
}

impl LlamaShape {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// One block's weights, `[out, in]` as in the GGUF (candle's order).
pub struct LlamaLayer {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub ffn_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// The keys and values of a prompt prefix that every sequence shares, per
/// layer `[1, n_head_kv, len, head_dim]`, computed once: nothing trained
/// comes before it, so it needs no gradient.
pub struct SharedPrefix {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
}

impl SharedPrefix {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The network: token table, blocks, final norm and output matrix.
pub struct FrozenLlama {
    shape: LlamaShape,
    token_embd: Tensor,
    /// `output.weight`, or the token table when the model ties them.
    output: Tensor,
    layers: Vec<LlamaLayer>,
    norm: Tensor,
    /// `[max_positions, head_dim / 2]` rotation tables.
    cos: Tensor,
    sin: Tensor,
}

/// Positions the rotation tables cover (the scorer's prompts are far shorter).
const MAX_POSITIONS: usize = 4096;

impl FrozenLlama {
    /// Loads a GGUF of the `llama` architecture, dequantising every weight
    /// to f32 (about 4 bytes a parameter: 540 MB for SmolLM2-135M).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("opening the decoder GGUF {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .with_context(|| format!("{} is not a readable GGUF", path.display()))?;
        let meta = |key: &str| content.metadata.get(key);
        let arch = meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        anyhow::ensure!(
            arch == "llama",
            "{}: architecture '{arch}'; train-projector's differentiable decoder covers the llama architecture only (SmolLM2 is one)",
            path.display()
        );
        let number = |key: &str| -> anyhow::Result<usize> {
            Ok(meta(&format!("llama.{key}"))
                .with_context(|| format!("{}: no llama.{key} in its metadata", path.display()))?
                .to_u32()? as usize)
        };
        let float = |key: &str, default: f32| -> anyhow::Result<f64> {
            Ok(f64::from(match meta(&format!("llama.{key}")) {
                Some(v) => v.to_f32()?,
                None => default,
            }))
        };
        let device = Device::Cpu;
        let mut tensor = |name: &str| -> anyhow::Result<Tensor> {
            Ok(content
                .tensor(&mut file, name, &device)
                .with_context(|| format!("{}: tensor {name}", path.display()))?
                .dequantize(&device)?)
        };
        let token_embd = tensor("token_embd.weight")?;
        let n_layer = number("block_count")?;
        let shape = LlamaShape {
            n_embd: number("embedding_length")?,
            n_head: number("attention.head_count")?,
            n_head_kv: number("attention.head_count_kv")?,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_base: float("rope.freq_base", 10_000.0)?,
        };
        if let Ok(rope_dims) = number("rope.dimension_count") {
            anyhow::ensure!(
                rope_dims == shape.head_dim(),
                "{}: RoPE over {rope_dims} of {} head dimensions is not supported",
                path.display(),
                shape.head_dim()
            );
        }
        let output = if content.tensor_infos.contains_key("output.weight") {
            tensor("output.weight")?
        } else {
            token_embd.clone()
        };
        let layers = (0..n_layer)
            .map(|i| -> anyhow::Result<LlamaLayer> {
                let mut get = |name: &str| tensor(&format!("blk.{i}.{name}.weight"));
                Ok(LlamaLayer {
                    attn_norm: get("attn_norm")?,
                    wq: get("attn_q")?,
                    wk: get("attn_k")?,
                    wv: get("attn_v")?,
                    wo: get("attn_output")?,
                    ffn_norm: get("ffn_norm")?,
                    gate: get("ffn_gate")?,
                    up: get("ffn_up")?,
                    down: get("ffn_down")?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let norm = tensor("output_norm.weight")?;
        Ok(Self::from_parts(shape, token_embd, output, layers, norm)?)
    }

    /// A model from its tensors (all of one float dtype; tests build small
    /// f64 ones).
    pub fn from_parts(
        shape: LlamaShape,
        token_embd: Tensor,
        output: Tensor,
        layers: Vec<LlamaLayer>,
        norm: Tensor,
    ) -> Result<Self> {
        let half = shape.head_dim() / 2;
        let angles: Vec<f64> = (0..MAX_POSITIONS)
            .flat_map(|pos| {
                (0..half).map(move |i| {
                    pos as f64
                        * shape
                            .rope_base
                            .powf(-2.0 * i as f64 / shape.head_dim() as f64)
                })
            })
            .collect();
        let table = |f: fn(f64) -> f64| {
            Tensor::from_vec(
                angles.iter().map(|&a| f(a)).collect::<Vec<f64>>(),
                (MAX_POSITIONS, half),
                token_embd.device(),
            )?
            .to_dtype(token_embd.dtype())
        };
        Ok(Self {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
            shape,
            token_embd,
            output,
            layers,
            norm,
        })
    }

    pub fn shape(&self) -> &LlamaShape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.token_embd.dtype()
    }

    /// The input rows of `tokens`, `[len, n_embd]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(tokens, self.token_embd.device())?;
        self.token_embd.index_select(&ids, 0)
    }

    /// Runs `tokens` (the prompt text every sequence starts with) once and
    /// keeps their keys and values.
    pub fn shared_prefix(&self, tokens: &[u32]) -> Result<SharedPrefix> {
        let mut x = self.embed(tokens)?.unsqueeze(0)?;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for layer in &self.layers {
            let (out, k, v) = self.block(layer, &x, None, 0)?;
            keys.push(k);
            values.push(v);
            x = out;
        }
        Ok(SharedPrefix {
            keys,
            values,
            len: tokens.len(),
        })
    }

    /// The final-norm hidden states `[batch, len, n_embd]` of input rows `x`
    /// `[batch, len, n_embd]` placed after `prefix` (every sequence of the
    /// batch continues the same prefix). Causal: a row sees the prefix and
    /// the rows before it, so right padding never changes a real position.
    pub fn forward(&self, x: &Tensor, prefix: Option<&SharedPrefix>) -> Result<Tensor> {
        let start = prefix.map_or(0, SharedPrefix::len);
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let past = prefix.map(|p| (&p.keys[i], &p.values[i]));
            x = self.block(layer, &x, past, start)?.0;
        }
        rms_norm(&x, &self.norm, self.shape.rms_eps)
    }

    /// Log-probabilities over the vocabulary `[n, n_vocab]` of hidden
    /// states `[n, n_embd]` (already through the final norm).
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = linear(hidden, &self.output)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)
    }

    /// One block; returns its output and this call's keys and values
    /// (after RoPE, before any repeat for grouped heads).
    fn block(
        &self,
        layer: &LlamaLayer,
        x: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
        start: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = &self.shape;
        let (b, t, _) = x.dims3()?;
        let hd = s.head_dim();
        let h = rms_norm(x, &layer.attn_norm, s.rms_eps)?;
        let heads = |w: &Tensor, n: usize| -> Result<Tensor> {
            linear(&h, w)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let q = candle_nn::rotary_emb::rope_i_slow(&heads(&layer.wq, s.n_head)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_i_slow(&heads(&layer.wk, s.n_head_kv)?, &cos, &sin)?;
        let v = heads(&layer.wv, s.n_head_kv)?;
        let (all_k, all_v) = match past {
            Some((pk, pv)) => {
                let p = pk.dim(2)?;
                let widen = |t: &Tensor| t.broadcast_as((b, s.n_head_kv, p, hd))?.contiguous();
                (
                    Tensor::cat(&[&widen(pk)?, &k], 2)?,
                    Tensor::cat(&[&widen(pv)?, &v], 2)?,
                )
            }
            None => (k.clone(), v.clone()),
        };
        let all = all_k.dim(2)?;
        let past_len = all - t;
        // Query head j reads key/value head j / (n_head / n_head_kv), as llama.cpp does.
        let repeat = |kv: &Tensor| -> Result<Tensor> {
            let group = s.n_head / s.n_head_kv;
            kv.unsqueeze(2)?
                .broadcast_as((b, s.n_head_kv, group, all, hd))?
                .reshape((b, s.n_head, all, hd))
        };
        let scores = (q.matmul(&repeat(&all_k)?.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..all).map(move |j| {
                    if j <= past_len + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, all), x.device())?.to_dtype(x.dtype())?;
        let weights = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        let context = weights
            .matmul(&repeat(&all_v)?)?
            .transpose(1, 2)?
            .reshape((b, t, s.n_head * hd))?;
        let x = (x + linear(&context, &layer.wo)?)?;
        let h = rms_norm(&x, &layer.ffn_norm, s.rms_eps)?;
        let mlp = (linear(&h, &layer.gate)?.silu()? * linear(&h, &layer.up)?)?;
        let out = (x + linear(&mlp, &layer.down)?)?;
        Ok((out, k, v))
    }
}

/// RMSNorm from plain ops (candle-nn's fused one has no backward pass).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}

/// `x W^T` for a frozen `w` `[out, in]`, over `x`'s last dimension.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("a tensor of rank >= 1");
    let flat = x.reshape((lead.iter().product::<usize>(), *last))?;
    let y = flat.apply_op1(FrozenLinear { w: w.clone() })?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// `x [n, in] -> x W^T [n, out]` with a backward pass to `x` only.
struct FrozenLinear {
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: input not contiguous".into()))?;
        let shape = layout.shape();
        // The product runs as an ordinary (untracked) matmul on a copy of
        // the input: the copy is n x in floats, the product n x in x out.
        let product = |x: Tensor| -> Result<Tensor> { x.matmul(&self.w.t()?) };
        let out = match storage {
            CpuStorage::F32(v) => {
                let y = product(Tensor::from_slice(&v[start..end], shape, &Device::Cpu)?)?;
                CpuStorage::F32(y.flatten_all()?.to_vec1()?)
            }
            CpuStorage::F64(v) => {
                let y = product(Tensor::from_slice(&v[start..end], shape, &Device::Cpu)?)?;
                CpuStorage::F64(y.flatten_all()?.to_vec1()?)
            }
            _ => candle_core::bail!("frozen-linear: only f32 and f64 inputs"),
        };
        Ok((out, Shape::from((shape.dims()[0], self.w.dim(0)?))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// The mean negative log-likelihood of `targets` under `log_probs` `[n, vocab]`.
pub fn mean_nll(log_probs: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let targets = Tensor::new(targets, log_probs.device())?;
    candle_nn::loss::nll(log_probs, &targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// A tiny random Llama in f64 (2 layers, 2 query heads sharing 1
    /// key/value head), where finite differences are exact enough to check
    /// gradients against.
    fn tiny() -> FrozenLlama {
        let shape = LlamaShape {
            n_embd: 8,
            n_head: 2,
            n_head_kv: 1,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
        };
        let mut seed = 1u64;
        let mut random = |dims: &[usize], scale: f64| {
            let n: usize = dims.iter().product();
            let values: Vec<f64> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2.0 * scale
                })
                .collect();
            Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
        };
        let (d, kv, ff) = (8, 4, 12);
        let layers = (0..2)
            .map(|_| LlamaLayer {
                attn_norm: (random(&[d], 0.2) + 1.0).unwrap(),
                wq: random(&[d, d], 0.5),
                wk: random(&[kv, d], 0.5),
                wv: random(&[kv, d], 0.5),
                wo: random(&[d, d], 0.5),
                ffn_norm: (random(&[d], 0.2) + 1.0).unwrap(),
                gate: random(&[ff, d], 0.5),
                up: random(&[ff, d], 0.5),
                down: random(&[d, ff], 0.5),
            })
            .collect();
        let embd = random(&[11, d], 1.0);
        let output = random(&[11, d], 1.0);
        let norm = (random(&[d], 0.2) + 1.0).unwrap();
        FrozenLlama::from_parts(shape, embd, output, layers, norm).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn a_shared_prefix_gives_what_the_whole_sequence_gives() {
        let model = tiny();
        let (pre, rest) = ([1u32, 4, 2], [7u32, 3, 9, 5]);
        let whole: Vec<u32> = pre.iter().chain(&rest).copied().collect();
        let full = model
            .forward(&model.embed(&whole).unwrap().unsqueeze(0).unwrap(), None)
            .unwrap();
        let prefix = model.shared_prefix(&pre).unwrap();
        let after = model
            .forward(
                &model.embed(&rest).unwrap().unsqueeze(0).unwrap(),
                Some(&prefix),
            )
            .unwrap();
        let want = values(&full.narrow(1, 3, 4).unwrap());
        for (a, b) in values(&after).iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn right_padding_leaves_the_real_positions_alone() {
        let model = tiny();
        let prefix = model.shared_prefix(&[1, 2]).unwrap();
        let solo = model
            .forward(
                &model.embed(&[5, 6]).unwrap().unsqueeze(0).unwrap(),
                Some(&prefix),
            )
            .unwrap();
        // Batched beside a longer sequence, padded with token 0.
        let batch = model
            .embed(&[5, 6, 0, 0, 3, 4, 8, 9])
            .unwrap()
            .reshape((2, 4, 8))
            .unwrap();
        let both = model.forward(&batch, Some(&prefix)).unwrap();
        let got = values(&both.get(0).unwrap().narrow(0, 0, 2).unwrap());
        for (a, b) in got.iter().zip(&values(&solo)) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn the_gradient_to_the_input_rows_matches_finite_differences() {
        let model = tiny();
        let prefix = model.shared_prefix(&[1, 4]).unwrap();
        let tokens = model.embed(&[6, 2, 9]).unwrap().unsqueeze(0).unwrap();
        let targets = [2u32, 9, 3];
        let loss_of = |rows: &Tensor| -> Tensor {
            let x = Tensor::cat(&[rows, &tokens], 1).unwrap();
            let hidden = model.forward(&x, Some(&prefix)).unwrap();
            // Rows at 0..2, tokens at 2..5: positions 1..4 predict the targets.
            let picked = hidden.squeeze(0).unwrap().narrow(0, 1, 3).unwrap();
            mean_nll(&model.log_probs(&picked).unwrap(), &targets).unwrap()
        };
        let start: Vec<f64> = (0..16).map(|i| (i as f64 * 0.37).sin()).collect();
        let rows = Var::from_vec(start.clone(), (1, 2, 8), &Device::Cpu).unwrap();
        let grads = loss_of(rows.as_tensor()).backward().unwrap();
        let analytic = values(grads.get(rows.as_tensor()).unwrap());
        let h = 1e-6;
        for i in 0..16 {
            let at = |delta: f64| {
                let mut v = start.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, (1, 2, 8), &Device::Cpu).unwrap();
                loss_of(&t).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "d loss / d row[{i}]: {} by backprop, {numeric} by finite differences",
                analytic[i]
            );
        }
    }
}
