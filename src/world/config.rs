//! World-model sizes: the file-format facts read off a checkpoint's tensor
//! shapes, the two that shapes cannot tell (num_heads, max_seq) from
//! arguments or `__metadata__`, and the full list of tensors a checkpoint of
//! a given size must hold (../shared/specs/world-checkpoint.md).

use std::collections::BTreeSet;

use serde::Serialize;

use super::checkpoint::Checkpoint;
use super::error::{Result, WorldError};

/// The seed's default number of attention heads, used when neither an argument
/// nor the checkpoint's metadata says otherwise.
pub const DEFAULT_NUM_HEADS: usize = 8;
/// The seed's default context length of the world model, in tokens.
pub const DEFAULT_MAX_SEQ: usize = 128;

/// The sizes of one world model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorldConfig {
    /// D: width of the encoder.
    pub dim: usize,
    /// L: number of encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block; divides `dim`.
    pub num_heads: usize,
    /// T: every prompt is truncated and padded to this many positions.
    pub max_seq: usize,
    /// V: rows of the embedding table, equal to the vocabulary size.
    pub vocab_size: usize,
    /// B: length of the conditioning vector.
    pub bridge_dim: usize,
}

/// One tensor a checkpoint must hold, with the rule that gives its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// The shape as a formula, quoted in errors ("[4·dim, dim]").
    pub rule: &'static str,
}

impl WorldConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// A: width of the transition's action embedding, max(D/4, 32).
    pub fn action_dim(&self) -> usize {
        (self.dim / 4).max(32)
    }

    /// H: hidden width of the transition MLP, max(3D/2, 128).
    pub fn transition_hidden(&self) -> usize {
        (3 * self.dim / 2).max(128)
    }

    /// F: hidden width of each block's feed-forward layer, 4D.
    pub fn ff_dim(&self) -> usize {
        4 * self.dim
    }

    /// Every tensor the forward pass reads, in the spec's order.
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (d, f) = (self.dim, self.ff_dim());
        let mut specs = Vec::new();
        let mut add =
            |name: String, shape: Vec<usize>, rule| specs.push(TensorSpec { name, shape, rule });
        add(
            "encoder.embed.weight".into(),
            vec![self.vocab_size, d],
            "[vocab, dim]",
        );
        for i in 0..self.num_layers {
            let b = format!("encoder.block_{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                add(format!("{b}.attn.{proj}.weight"), vec![d, d], "[dim, dim]");
                add(format!("{b}.attn.{proj}.bias"), vec![d], "[dim]");
            }
            for ln in ["ln1", "ln2"] {
                add(format!("{b}.{ln}.weight"), vec![d], "[dim]");
                add(format!("{b}.{ln}.bias"), vec![d], "[dim]");
            }
            add(format!("{b}.ff1.weight"), vec![f, d], "[4·dim, dim]");
            add(format!("{b}.ff1.bias"), vec![f], "[4·dim]");
            add(format!("{b}.ff2.weight"), vec![d, f], "[dim, 4·dim]");
            add(format!("{b}.ff2.bias"), vec![d], "[dim]");
        }
        add("encoder.ln_final.weight".into(), vec![d], "[dim]");
        add("encoder.ln_final.bias".into(), vec![d], "[dim]");
        let (a, h) = (self.action_dim(), self.transition_hidden());
        add(
            "world_transition.action_embed.weight".into(),
            vec![1, a],
            "[1, max(dim/4, 32)]",
        );
        add(
            "world_transition.fc1.weight".into(),
            vec![h, d + a],
            "[max(3·dim/2, 128), dim + max(dim/4, 32)]",
        );
        add(
            "world_transition.fc1.bias".into(),
            vec![h],
            "[max(3·dim/2, 128)]",
        );
        add(
            "world_transition.fc2.weight".into(),
            vec![d, h],
            "[dim, max(3·dim/2, 128)]",
        );
        add("world_transition.fc2.bias".into(), vec![d], "[dim]");
        add(
            "decoder_bridge.proj.weight".into(),
            vec![self.bridge_dim, d],
            "[bridge_dim, dim]",
        );
        add(
            "decoder_bridge.proj.bias".into(),
            vec![self.bridge_dim],
            "[bridge_dim]",
        );
        specs
    }

    /// The `__metadata__` this project writes beside the tensors, so that
    /// loaders need no size arguments.
    pub fn metadata(&self) -> Vec<(String, String)> {
        [
            ("num_heads", self.num_heads),
            ("max_seq", self.max_seq),
            ("dim", self.dim),
            ("num_layers", self.num_layers),
            ("bridge_dim", self.bridge_dim),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A one-line description for logs and the CLI.
    pub fn summary(&self) -> String {
        format!(
            "dim {}, layers {}, heads {}, max_seq {}, vocab {}, bridge {}",
            self.dim,
            self.num_layers,
            self.num_heads,
            self.max_seq,
            self.vocab_size,
            self.bridge_dim
        )
    }
}

/// Sizes the user asked for; `None` means "read it from the checkpoint".
/// Explicit values always win over metadata, and must agree with the shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorldOverrides {
    pub dim: Option<usize>,
    pub max_seq: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    pub bridge_dim: Option<usize>,
}

/// Works out the model's sizes from the checkpoint's shapes, its metadata
/// and the user's overrides, then checks every tensor against them.
pub fn resolve(ckpt: &Checkpoint, overrides: &WorldOverrides) -> Result<WorldConfig> {
    let path = ckpt.path().to_path_buf();
    let config_error = |message: String| WorldError::Config {
        path: path.clone(),
        message,
    };

    let embed = "encoder.embed.weight";
    let &[vocab_size, dim] = ckpt.shape(embed)? else {
        return Err(config_error(format!(
            "tensor `{embed}` has shape {:?}, expected a [vocab, dim] matrix",
            ckpt.shape(embed)?
        )));
    };
    if let Some(want) = overrides.dim.filter(|&want| want != dim) {
        return Err(WorldError::Shape {
            path,
            name: embed.into(),
            expected: vec![vocab_size, want],
            found: vec![vocab_size, dim],
            why: format!("dim {want} from --dim"),
        });
    }

    let bridge = "decoder_bridge.proj.weight";
    let bridge_dim = match ckpt.shape(bridge)? {
        &[b, _] => b,
        other => {
            return Err(config_error(format!(
                "tensor `{bridge}` has shape {other:?}, expected a [bridge_dim, dim] matrix"
            )));
        }
    };
    if let Some(want) = overrides.bridge_dim.filter(|&want| want != bridge_dim) {
        return Err(WorldError::Shape {
            path,
            name: bridge.into(),
            expected: vec![want, dim],
            found: ckpt.shape(bridge)?.to_vec(),
            why: format!("bridge_dim {want} from --bridge-dim"),
        });
    }

    let num_layers = count_blocks(ckpt);
    if num_layers == 0 {
        return Err(WorldError::MissingTensor {
            path,
            name: "encoder.block_0.attn.q_proj.weight".into(),
        });
    }
    if let Some(want) = overrides.num_layers.filter(|&want| want != num_layers) {
        return Err(WorldError::Layers {
            path,
            found: num_layers,
            requested: want,
            source_of: "--layers",
        });
    }

    let (num_heads, heads_from) = pick(
        overrides.num_heads,
        ckpt.metadata_usize("num_heads")?,
        DEFAULT_NUM_HEADS,
    );
    let (max_seq, seq_from) = pick(
        overrides.max_seq,
        ckpt.metadata_usize("max_seq")?,
        DEFAULT_MAX_SEQ,
    );
    if num_heads == 0 {
        return Err(config_error(format!(
            "num_heads 0 ({heads_from}) must be at least 1"
        )));
    }
    if max_seq == 0 {
        return Err(config_error(format!(
            "max_seq 0 ({seq_from}) must be at least 1"
        )));
    }
    if dim % num_heads != 0 {
        return Err(config_error(format!(
            "dim {dim} (from encoder.embed.weight) is not divisible by num_heads {num_heads} ({heads_from}); pass --heads with a divisor of {dim}"
        )));
    }

    let config = WorldConfig {
        dim,
        num_layers,
        num_heads,
        max_seq,
        vocab_size,
        bridge_dim,
    };
    for spec in config.tensor_specs() {
        let found = ckpt.shape(&spec.name)?;
        if found != spec.shape.as_slice() {
            return Err(WorldError::Shape {
                path,
                name: spec.name,
                expected: spec.shape,
                found: found.to_vec(),
                why: format!("{} with {}", spec.rule, config.summary()),
            });
        }
    }
    Ok(config)
}

/// Chooses argument over metadata over default, and says which one won.
fn pick(arg: Option<usize>, meta: Option<usize>, default: usize) -> (usize, &'static str) {
    match (arg, meta) {
        (Some(v), _) => (v, "from arguments"),
        (None, Some(v)) => (v, "from the checkpoint's metadata"),
        (None, None) => (default, "the default"),
    }
}

/// Number of encoder blocks: one more than the highest `encoder.block_{i}`.
/// Gaps are caught later as missing tensors.
fn count_blocks(ckpt: &Checkpoint) -> usize {
    let indices: BTreeSet<usize> = ckpt
        .names()
        .iter()
        .filter_map(|name| {
            name.strip_prefix("encoder.block_")?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    indices.last().map_or(0, |last| last + 1)
}
