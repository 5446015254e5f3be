//! Control vectors: a direction added to the decoder's residual stream at
//! the output of each layer of a range, for one request.
//!
//! llama.cpp holds one control vector per context (`llama_set_adapter_cvec`)
//! and adds it to every row of every batch. Per request, the llama backend
//! therefore evaluates the rows of each distinct vector in their own
//! `llama_process` call, switching the context's vector between them, and
//! keys its prompt cache on the vector too: cells written under one vector
//! are never reused under another.
//!
//! Layers are numbered as llama.cpp numbers them: layer `il` (0-based) adds
//! its direction to its own output; layer 0 never takes one, so the first
//! layer a vector may start at is 1.

use std::ops::RangeInclusive;
use std::sync::Arc;

use super::embeddings::hash_row;

/// What is wrong with a control vector (each says what to send).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("a control vector needs a width (n_embd) of at least 1")]
    ZeroWidth,
    #[error(
        "a control vector starts at layer 1 at the earliest (llama.cpp's layer 0 takes none); got {0}"
    )]
    LayerZero(usize),
    #[error("the control vector's layer range {start}..={end} is empty; give start <= end")]
    EmptyRange { start: usize, end: usize },
    #[error(
        "{len} values are not one direction of {width} per layer of {start}..={end} ({layers} layers)"
    )]
    Shape {
        len: usize,
        width: usize,
        start: usize,
        end: usize,
        layers: usize,
    },
    #[error(
        "the control vector has a non-finite value (NaN or infinity) or one beyond ±1e6 at layer {layer}, column {column}"
    )]
    NotFinite { layer: usize, column: usize },
    #[error("the control vector is {got} wide but this model's hidden size (n_embd) is {expected}")]
    Width { got: usize, expected: usize },
    #[error(
        "the control vector reaches layer {end} but this model's last layer that takes one is {last}"
    )]
    Layers { end: usize, last: usize },
}

/// The largest magnitude a direction value may have.
pub const MAX_ABS: f32 = 1e6;

/// One `n_embd` direction per layer of `layers`, checked once when built,
/// shared cheaply, compared by content.
#[derive(Clone)]
pub struct ControlVector {
    /// `layers.len() x width`, row-major: row `i` is layer `start + i`.
    data: Arc<[f32]>,
    width: usize,
    start: usize,
    end: usize,
    hash: u64,
}

impl ControlVector {
    /// Checks and wraps `data`: one `width`-long direction for each layer
    /// of `layers`, in order.
    pub fn new(
        data: Vec<f32>,
        width: usize,
        layers: RangeInclusive<usize>,
    ) -> Result<Self, ControlError> {
        let (start, end) = (*layers.start(), *layers.end());
        if width == 0 {
            return Err(ControlError::ZeroWidth);
        }
        if start == 0 {
            return Err(ControlError::LayerZero(start));
        }
        if start > end {
            return Err(ControlError::EmptyRange { start, end });
        }
        let count = end - start + 1;
        if Some(data.len()) != count.checked_mul(width) {
            return Err(ControlError::Shape {
                len: data.len(),
                width,
                start,
                end,
                layers: count,
            });
        }
        if let Some(at) = data
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_ABS)
        {
            return Err(ControlError::NotFinite {
                layer: start + at / width,
                column: at % width,
            });
        }
        // The layers are compared apart from the hash (in `same`).
        let hash = hash_row(&data);
        Ok(Self {
            data: data.into(),
            width,
            start,
            end,
            hash,
        })
    }

    /// The same `direction` times `strength` at every layer of `layers`
    /// (llama-server's `--control-vector-scaled` with a one-direction file).
    pub fn uniform(
        direction: &[f32],
        strength: f32,
        layers: RangeInclusive<usize>,
    ) -> Result<Self, ControlError> {
        let count = layers.end().saturating_sub(*layers.start()) + 1;
        let scaled: Vec<f32> = direction.iter().map(|v| v * strength).collect();
        let data = if layers.start() <= layers.end() {
            scaled.repeat(count)
        } else {
            scaled
        };
        Self::new(data, direction.len(), layers)
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn layers(&self) -> RangeInclusive<usize> {
        self.start..=self.end
    }

    /// The direction added at the output of `layer`, if it is in range.
    pub fn direction(&self, layer: usize) -> Option<&[f32]> {
        (self.start..=self.end)
            .contains(&layer)
            .then(|| &self.data[(layer - self.start) * self.width..][..self.width])
    }

    /// Whether `self` and `other` add exactly the same values at the same
    /// layers (the hash first, then every bit).
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
            || (self.hash == other.hash
                && (self.start, self.end, self.width) == (other.start, other.end, other.width)
                && self
                    .data
                    .iter()
                    .zip(other.data.iter())
                    .all(|(a, b)| a.to_bits() == b.to_bits()))
    }

    /// Checks the vector against a model of `n_embd` and `n_layer` layers.
    pub fn check(&self, n_embd: usize, n_layer: usize) -> Result<(), ControlError> {
        if self.width != n_embd {
            return Err(ControlError::Width {
                got: self.width,
                expected: n_embd,
            });
        }
        let last = n_layer.saturating_sub(1);
        if self.end > last {
            return Err(ControlError::Layers {
                end: self.end,
                last,
            });
        }
        Ok(())
    }

    /// The buffer `llama_set_adapter_cvec` reads: `n_embd` values for each
    /// of layers 1..n_layer, zeros outside the range. llama.cpp keeps the
    /// old values of layers the buffer does not cover, so it always covers
    /// them all.
    pub fn llama_buffer(&self, n_layer: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.width * n_layer.saturating_sub(1)];
        for layer in self.start..=self.end.min(n_layer.saturating_sub(1)) {
            let at = (layer - 1) * self.width;
            out[at..at + self.width].copy_from_slice(self.direction(layer).expect("in range"));
        }
        out
    }
}

/// Two optional vectors are the same steer: both absent, or the same
/// values.
pub fn same_control(a: Option<&ControlVector>, b: Option<&ControlVector>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same(b),
        _ => false,
    }
}

impl std::fmt::Debug for ControlVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlVector")
            .field("width", &self.width)
            .field("layers", &(self.start..=self.end))
            .field("hash", &format_args!("{:016x}", self.hash))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_range_and_values_are_checked() {
        assert_eq!(
            ControlVector::new(vec![0.0; 4], 2, 0..=1).unwrap_err(),
            ControlError::LayerZero(0)
        );
        #[allow(clippy::reversed_empty_ranges)] // the point of the check
        let backwards = 3..=2;
        assert!(matches!(
            ControlVector::new(vec![0.0; 4], 2, backwards),
            Err(ControlError::EmptyRange { .. })
        ));
        assert!(matches!(
            ControlVector::new(vec![0.0; 5], 2, 1..=2),
            Err(ControlError::Shape { len: 5, .. })
        ));
        assert_eq!(
            ControlVector::new(vec![0.0, 0.0, f32::NAN, 0.0], 2, 4..=5).unwrap_err(),
            ControlError::NotFinite {
                layer: 5,
                column: 0
            }
        );
        let v = ControlVector::new(vec![1.0, 2.0, 3.0, 4.0], 2, 2..=3).unwrap();
        assert_eq!(v.direction(3), Some(&[3.0, 4.0][..]));
        assert_eq!(v.direction(1), None);
        assert!(v.check(2, 4).is_ok());
        assert!(matches!(
            v.check(2, 3),
            Err(ControlError::Layers { end: 3, last: 2 })
        ));
        assert!(matches!(v.check(3, 4), Err(ControlError::Width { .. })));
    }

    #[test]
    fn the_llama_buffer_starts_at_layer_one_with_zeros_outside_the_range() {
        let v = ControlVector::uniform(&[1.0, -1.0], 2.0, 2..=3).unwrap();
        assert_eq!(
            v.llama_buffer(5),
            [0.0, 0.0, 2.0, -2.0, 2.0, -2.0, 0.0, 0.0]
        );
    }

    #[test]
    fn equal_values_are_the_same_steer_and_others_are_not() {
        let a = ControlVector::uniform(&[0.5, 0.25], 1.0, 1..=2).unwrap();
        let b = ControlVector::uniform(&[0.5, 0.25], 1.0, 1..=2).unwrap();
        let other_layers = ControlVector::uniform(&[0.5, 0.25], 1.0, 2..=3).unwrap();
        let other_values = ControlVector::uniform(&[0.5, 0.26], 1.0, 1..=2).unwrap();
        assert!(a.same(&b));
        assert!(!a.same(&other_layers));
        assert!(!a.same(&other_values));
        assert!(same_control(None, None));
        assert!(!same_control(Some(&a), None));
    }
}
