//! The projector: the world model's conditioning vector (`bridge_dim`
//! floats) to K embedding rows of the decoder's input width, the `prefix`
//! conditioning mode's channel.
//!
//! A projector is a safetensors file: `weight` `[K * n_embd, bridge_dim]`
//! and `bias` `[K * n_embd]` (f32), and in its metadata `tofy.format` =
//! `projector/1`, `k`, `n_embd`, `bridge_dim`, `gguf_name` (the decoder it
//! was made for) and optionally `row_norm`: when set, each output row is
//! rescaled to that L2 norm, so that rows sit at the norm of real token
//! embeddings whatever the vector's scale.
//!
//! A projector with `control_layers` = `"<start>-<end>"` in its metadata
//! (and K = 1) is a *control map* (`tofy fit-control`): its row, times a
//! strength, is a control vector added at the output of those layers
//! ([`Projector::control`]).
//!
//! The embedded default ([`Projector::embedded`]) is trained for the
//! embedded world model x SmolLM2-135M-Instruct by gradient through the
//! frozen decoder (`tofy train-projector`), starting from the ridge fit
//! (`tofy fit-projector`, K = 4, ridge 10, rows at norm 6); the fit and the
//! random placeholder before it stay in the repository for comparison.
//! `models/projector/README.md` says how each was made and what each does
//! (in short: the trained rows make replies far more likely, but another
//! prompt's world vector does as well as the prompt's own).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, SafeTensors};

use crate::decoder::{ControlError, ControlVector, Embeddings, EmbeddingsError};
use crate::world::checkpoint::{self, TensorData};

/// The format tag in the metadata.
pub const FORMAT: &str = "projector/1";
/// Where the embedded projector lives in the repository.
pub const EMBEDDED_PATH: &str = "models/projector/smollm2-135m-trained.safetensors";
static EMBEDDED: &[u8] = include_bytes!("../models/projector/smollm2-135m-trained.safetensors");
/// The random placeholder the fitted projector replaced (`make placeholder-projector`).
pub const PLACEHOLDER_PATH: &str = "models/projector/smollm2-135m-placeholder.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("projector {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "projector {path}: {what}; make one with `tofy random-projector` (or the next issue's fit-projector)"
    )]
    Format { path: String, what: String },
    #[error(
        "projector {path} makes rows of {n_embd} values for {gguf_name}, but the decoder {model} takes rows of {expected}; use a projector made for this GGUF (--projector / TOFY_PROJECTOR)"
    )]
    Width {
        path: String,
        n_embd: usize,
        gguf_name: String,
        model: String,
        expected: usize,
    },
    #[error(
        "the conditioning vector has {got} values but projector {path} takes {expected} (the world model's bridge_dim)"
    )]
    VectorLength {
        path: String,
        got: usize,
        expected: usize,
    },
    #[error(transparent)]
    Rows(#[from] EmbeddingsError),
    #[error(
        "projector {path} is not a control map (no control_layers, or K {k} is not 1); make one with `tofy fit-control`"
    )]
    NotControl { path: String, k: usize },
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A linear map from the world vector to K rows.
#[derive(Debug, Clone)]
pub struct Projector {
    /// `[k * n_embd][bridge_dim]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    n_embd: usize,
    bridge_dim: usize,
    row_norm: Option<f32>,
    gguf_name: String,
    /// The layers a control map's vector is added at (inclusive).
    control_layers: Option<(usize, usize)>,
    /// Where it came from, for messages.
    source: String,
}

impl Projector {
    /// The embedded (trained) projector for SmolLM2-135M-Instruct.
    pub fn embedded() -> Self {
        Self::from_bytes(EMBEDDED, EMBEDDED_PATH).expect("the embedded projector is valid")
    }

    /// Loads a projector file.
    pub fn load(path: &Path) -> Result<Self, ProjectorError> {
        let bytes = std::fs::read(path).map_err(|source| ProjectorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses a projector file's bytes; `source` names it in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self, ProjectorError> {
        let err = |what: String| ProjectorError::Format {
            path: source.to_string(),
            what,
        };
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("tofy.format").map(String::as_str) != Some(FORMAT) {
            return Err(err(format!(
                "metadata tofy.format is not {FORMAT} (not a tofy projector)"
            )));
        }
        let number = |key: &str| -> Result<usize, ProjectorError> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    err(format!(
                        "metadata {key} is missing or not a positive number"
                    ))
                })
        };
        let (k, n_embd, bridge_dim) = (number("k")?, number("n_embd")?, number("bridge_dim")?);
        let row_norm = match meta.get("row_norm") {
            None => None,
            Some(v) => Some(
                v.parse::<f32>()
                    .ok()
                    .filter(|n| n.is_finite() && *n > 0.0)
                    .ok_or_else(|| {
                        err(format!("metadata row_norm '{v}' is not a positive number"))
                    })?,
            ),
        };
        let control_layers = match meta.get("control_layers") {
            None => None,
            Some(v) => Some(
                v.split_once('-')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                    .filter(|&(a, b): &(usize, usize)| a >= 1 && a <= b)
                    .ok_or_else(|| {
                        err(format!(
                            "metadata control_layers '{v}' is not <start>-<end> with 1 <= start <= end"
                        ))
                    })?,
            ),
        };
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("unreadable tensors ({e})")))?;
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ProjectorError> {
            let t = tensors
                .tensor(name)
                .map_err(|_| err(format!("no {name} tensor")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(err(format!(
                    "{name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(err(format!("{name} holds NaN or infinite values")));
            }
            Ok(values)
        };
        Ok(Self {
            weight: read("weight", &[k * n_embd, bridge_dim])?,
            bias: read("bias", &[k * n_embd])?,
            k,
            n_embd,
            bridge_dim,
            row_norm,
            gguf_name: meta.get("gguf_name").cloned().unwrap_or_default(),
            control_layers,
            source: source.to_string(),
        })
    }

    /// A fixed random projection: weights uniform in ±sqrt(3 / bridge_dim)
    /// (unit variance per output for a unit-variance vector), no bias, rows
    /// rescaled to `row_norm`. The same arguments give the same projector.
    pub fn random(
        bridge_dim: usize,
        k: usize,
        n_embd: usize,
        row_norm: f32,
        seed: u64,
        gguf_name: &str,
    ) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let bound = (3.0 / bridge_dim as f32).sqrt();
        let weight = (0..k * n_embd * bridge_dim)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Self::from_parts(
            weight,
            vec![0.0; k * n_embd],
            k,
            n_embd,
            bridge_dim,
            Some(row_norm),
            gguf_name,
            format!("random projector (seed {seed})"),
        )
    }

    /// A projector from its parts: `weight` `[k * n_embd][bridge_dim]`
    /// row-major, `bias` `k * n_embd`. Panics on lengths that disagree.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        weight: Vec<f32>,
        bias: Vec<f32>,
        k: usize,
        n_embd: usize,
        bridge_dim: usize,
        row_norm: Option<f32>,
        gguf_name: &str,
        source: String,
    ) -> Self {
        assert_eq!(weight.len(), k * n_embd * bridge_dim, "weight length");
        assert_eq!(bias.len(), k * n_embd, "bias length");
        Self {
            weight,
            bias,
            k,
            n_embd,
            bridge_dim,
            row_norm,
            gguf_name: gguf_name.to_string(),
            control_layers: None,
            source,
        }
    }

    /// Makes this (K = 1) projector a control map over `layers`.
    pub fn with_control_layers(mut self, start: usize, end: usize) -> Self {
        self.control_layers = Some((start, end));
        self
    }

    /// The layers of a control map.
    pub fn control_layers(&self) -> Option<(usize, usize)> {
        self.control_layers
    }

    /// A control map's vector for `vector`: its row times `strength`, at
    /// every layer of its range.
    pub fn control(&self, vector: &[f32], strength: f32) -> Result<ControlVector, ProjectorError> {
        let (start, end) = self.control_layers.filter(|_| self.k == 1).ok_or_else(|| {
            ProjectorError::NotControl {
                path: self.source.clone(),
                k: self.k,
            }
        })?;
        let row = self.project(vector)?;
        Ok(ControlVector::uniform(row.row(0), strength, start..=end)?)
    }

    /// Writes the projector (atomically, as checkpoints are).
    pub fn save(&self, path: &Path, description: &str) -> Result<(), ProjectorError> {
        let mut meta = HashMap::from([
            ("tofy.format".to_string(), FORMAT.to_string()),
            ("k".to_string(), self.k.to_string()),
            ("n_embd".to_string(), self.n_embd.to_string()),
            ("bridge_dim".to_string(), self.bridge_dim.to_string()),
            ("gguf_name".to_string(), self.gguf_name.clone()),
            ("description".to_string(), description.to_string()),
        ]);
        if let Some(norm) = self.row_norm {
            meta.insert("row_norm".to_string(), norm.to_string());
        }
        if let Some((start, end)) = self.control_layers {
            meta.insert("control_layers".to_string(), format!("{start}-{end}"));
        }
        let tensors = [
            (
                "weight".to_string(),
                TensorData::new(vec![self.k * self.n_embd, self.bridge_dim], &self.weight),
            ),
            (
                "bias".to_string(),
                TensorData::new(vec![self.k * self.n_embd], &self.bias),
            ),
        ];
        checkpoint::save(path, &tensors, Some(meta)).map_err(|e| ProjectorError::Format {
            path: path.display().to_string(),
            what: e.to_string(),
        })
    }

    /// Rows per vector.
    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    pub fn bridge_dim(&self) -> usize {
        self.bridge_dim
    }

    /// L2 norm each row is rescaled to, if any.
    pub fn row_norm(&self) -> Option<f32> {
        self.row_norm
    }

    /// The weight `[k * n_embd][bridge_dim]` (row-major) and the bias.
    pub fn parameters(&self) -> (&[f32], &[f32]) {
        (&self.weight, &self.bias)
    }

    pub fn gguf_name(&self) -> &str {
        &self.gguf_name
    }

    /// Where it was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// An error unless the decoder `model` takes rows of this width.
    pub fn check_width(&self, expected: usize, model: &str) -> Result<(), ProjectorError> {
        if self.n_embd == expected {
            Ok(())
        } else {
            Err(ProjectorError::Width {
                path: self.source.clone(),
                n_embd: self.n_embd,
                gguf_name: self.gguf_name.clone(),
                model: model.to_string(),
                expected,
            })
        }
    }

    /// The K rows for `vector`.
    pub fn project(&self, vector: &[f32]) -> Result<Embeddings, ProjectorError> {
        if vector.len() != self.bridge_dim {
            return Err(ProjectorError::VectorLength {
                path: self.source.clone(),
                got: vector.len(),
                expected: self.bridge_dim,
            });
        }
        let mut out: Vec<f32> = self
            .weight
            .chunks_exact(self.bridge_dim)
            .zip(&self.bias)
            .map(|(w, b)| {
                let dot: f64 = w
                    .iter()
                    .zip(vector)
                    .map(|(&a, &x)| f64::from(a) * f64::from(x))
                    .sum();
                (dot + f64::from(*b)) as f32
            })
            .collect();
        if let Some(norm) = self.row_norm {
            for row in out.chunks_exact_mut(self.n_embd) {
                // In f64: a row of large values must not overflow its norm.
                let l2 = row
                    .iter()
                    .map(|&v| f64::from(v).powi(2))
                    .sum::<f64>()
                    .sqrt();
                // A zero row (a zero vector through a bias-free map) stays
                // zero: there is no direction to scale.
                if l2 > 0.0 && l2.is_finite() {
                    let scale = f64::from(norm) / l2;
                    row.iter_mut()
                        .for_each(|v| *v = (f64::from(*v) * scale) as f32);
                }
            }
        }
        Ok(Embeddings::new(out, self.n_embd)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_the_set_norm_and_the_file_round_trips() {
        let p = Projector::random(8, 2, 5, 3.0, 7, "test.gguf");
        let z: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let rows = p.project(&z).unwrap();
        assert_eq!((rows.n_rows(), rows.width()), (2, 5));
        for r in 0..2 {
            let l2 = rows.row(r).iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((l2 - 3.0).abs() < 1e-5, "{l2}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.safetensors");
        p.save(&path, "test").unwrap();
        let back = Projector::load(&path).unwrap();
        assert_eq!(back.project(&z).unwrap(), rows);
        assert_eq!(back.gguf_name(), "test.gguf");
        let err = back.project(&[1.0; 3]).unwrap_err().to_string();
        assert!(
            err.contains("has 3 values") && err.contains("takes 8"),
            "{err}"
        );
        let err = back.check_width(576, "m.gguf").unwrap_err().to_string();
        assert!(
            err.contains("rows of 5") && err.contains("rows of 576"),
            "{err}"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_projector() {
        let a = Projector::random(4, 1, 3, 1.0, 0, "x");
        let b = Projector::random(4, 1, 3, 1.0, 0, "x");
        let c = Projector::random(4, 1, 3, 1.0, 1, "x");
        assert_eq!(a.weight, b.weight);
        assert_ne!(a.weight, c.weight);
    }

    #[test]
    fn a_file_that_is_not_a_projector_is_one_clear_error() {
        let err = Projector::from_bytes(b"not safetensors", "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("projector x.safetensors: not a safetensors file"),
            "{err}"
        );
        let world = std::fs::read(crate::world::default::MODEL_PATH).unwrap();
        let err = Projector::from_bytes(&world, "w").unwrap_err().to_string();
        assert!(err.contains("not a tofy projector"), "{err}");
    }
}
