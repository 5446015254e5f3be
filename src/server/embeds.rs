//! Embedding rows sent over HTTP (`prompt_embeds`, `tofy.prefix_embeddings`),
//! in one of two encodings, never pickle or a torch format:
//!
//! - `{"shape": [n, d], "data": "<base64 of n*d little-endian f32>"}`;
//! - a JSON list of rows, `[[f32; d]; n]`.
//!
//! Everything the claimed shape implies is checked before it is allocated
//! from: the width against the model's `n_embd_inp`, the row count against
//! the context, and the base64 length against `n * d * 4` bytes. Values must
//! be finite. Each failure is a 400 naming the parameter.

use base64::Engine as _;
use serde_json::Value;

use super::ApiError;
use crate::decoder::Embeddings;

/// The limits rows are checked against.
pub(crate) struct Limits {
    /// The model's `n_embd_inp`.
    pub width: usize,
    /// The context, in positions.
    pub context: usize,
}

/// Parses `value` (the field named `param`) into checked rows.
pub(crate) fn parse(
    value: &Value,
    limits: &Limits,
    param: &'static str,
) -> Result<Embeddings, ApiError> {
    let bad = |message: String| ApiError::invalid_param(param, format!("{param}: {message}"));
    let check_shape = |rows: usize, width: usize| {
        if width != limits.width {
            return Err(bad(format!(
                "rows are {width} wide but this model's input width (n_embd) is {}; build rows of {} values",
                limits.width, limits.width
            )));
        }
        if rows == 0 {
            return Err(bad("no rows; send at least one".into()));
        }
        if rows >= limits.context {
            return Err(bad(format!(
                "{rows} rows do not fit the context of {} positions (JEPA_DECODER_CTX)",
                limits.context
            )));
        }
        Ok(())
    };
    let data = match value {
        Value::Object(object) => {
            let dim = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
            let shape = object
                .get("shape")
                .and_then(Value::as_array)
                .filter(|s| s.len() == 2)
                .and_then(|s| Some((dim(&s[0])?, dim(&s[1])?)))
                .ok_or_else(|| bad("shape must be [rows, width], two whole numbers".into()))?;
            check_shape(shape.0, shape.1)?;
            let text = object.get("data").and_then(Value::as_str).ok_or_else(|| {
                bad("data must be a base64 string of little-endian f32 values".into())
            })?;
            // Bounded by the checks above (width = the model's, rows below
            // the context), and checked all the same.
            let too_big = || bad("shape is too large".into());
            let bytes = shape
                .0
                .checked_mul(shape.1)
                .and_then(|n| n.checked_mul(4))
                .ok_or_else(too_big)?;
            // Standard base64 with padding: 4 characters per 3 bytes.
            let encoded = bytes.div_ceil(3).checked_mul(4).ok_or_else(too_big)?;
            if text.len() != encoded {
                return Err(bad(format!(
                    "data is {} base64 characters, but shape {:?} needs {bytes} bytes, which is {encoded} characters (standard alphabet, with padding)",
                    text.len(),
                    [shape.0, shape.1]
                )));
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| bad(format!("data is not valid base64 ({e})")))?;
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect()
        }
        Value::Array(rows) => {
            let width = rows
                .first()
                .and_then(Value::as_array)
                .map_or(limits.width, Vec::len);
            check_shape(rows.len(), width)?;
            let mut data = Vec::with_capacity(rows.len() * width);
            for (i, row) in rows.iter().enumerate() {
                let row = row
                    .as_array()
                    .filter(|r| r.len() == width)
                    .ok_or_else(|| bad(format!("row {i} is not a list of {width} numbers")))?;
                for (j, v) in row.iter().enumerate() {
                    let v = v
                        .as_f64()
                        .ok_or_else(|| bad(format!("row {i}, column {j} is not a number")))?;
                    data.push(v as f32);
                }
            }
            data
        }
        _ => {
            return Err(bad(
                "send {\"shape\": [rows, width], \"data\": \"<base64 f32>\"} or a list of rows"
                    .into(),
            ));
        }
    };
    Embeddings::new(data, limits.width).map_err(|e| bad(e.to_string()))
}
