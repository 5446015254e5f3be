//! What the decoder is told about the world model's prediction.
//!
//! [`CondMode`] (`JEPA_DECODER_COND_MODE`) picks the channel:
//! - `text`: the vector written into the system message
//!   (`JEPA_DECODER_COND_FORMAT` = `chunks` | `stats` | `both`, exactly as
//!   `specs/world-checkpoint.md` fixes them);
//! - `prefix`: the same system message, with K embedding rows from a
//!   [`crate::projector::Projector`] in the place of the numbers;
//! - `none`: no conditioning message at all.
//!
//! [`Conditioning`] keeps the raw vector, so every channel takes it as is.

use std::fmt::Write;
use std::str::FromStr;

/// How the vector is written into the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CondFormat {
    /// 8 chunk means: `chunks=[a,b,c,d,e,f,g,h]`.
    #[default]
    Chunks,
    /// The seed's legacy summary: `mean=…,std=…,l2=…,head=[…]`.
    Stats,
    /// Chunks, one space, stats.
    Both,
}

impl CondFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Chunks => "chunks",
            Self::Stats => "stats",
            Self::Both => "both",
        }
    }
}

/// Which channel carries the conditioning to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CondMode {
    /// The vector as numbers in the system message (the seed's way).
    #[default]
    Text,
    /// The system message's instruction, then K projected embedding rows.
    Prefix,
    /// No message; a control vector made from the world vector (a control
    /// map, `--control`) is added to the decoder's residual stream.
    Cvec,
    /// No conditioning message.
    None,
}

impl CondMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Prefix => "prefix",
            Self::Cvec => "cvec",
            Self::None => "none",
        }
    }
}

/// An unknown `JEPA_DECODER_COND_MODE` / `cond_mode` name.
#[derive(Debug, thiserror::Error)]
#[error("unknown conditioning mode '{0}': use text, prefix, cvec or none")]
pub struct UnknownMode(pub String);

impl FromStr for CondMode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "prefix" => Ok(Self::Prefix),
            "cvec" => Ok(Self::Cvec),
            "none" => Ok(Self::None),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}

/// An unknown `JEPA_DECODER_COND_FORMAT` / `cond_format` name.
#[derive(Debug, thiserror::Error)]
#[error("unknown conditioning format '{0}': use chunks, stats or both")]
pub struct UnknownFormat(pub String);

impl FromStr for CondFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "chunks" => Ok(Self::Chunks),
            "stats" => Ok(Self::Stats),
            "both" => Ok(Self::Both),
            other => Err(UnknownFormat(other.to_string())),
        }
    }
}

/// The world model's conditioning vector for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    pub vector: Vec<f32>,
    /// Real (unpadded) world-model tokens the prompt became.
    pub world_tokens: usize,
    /// True when the vector was replaced by zeros (`--ablate-conditioning`).
    pub ablated: bool,
}

impl Conditioning {
    /// The vector written as `format` says.
    pub fn as_text(&self, format: CondFormat) -> String {
        format_vector(&self.vector, format)
    }

    /// The system message that carries the conditioning to the decoder.
    pub fn system_message(&self, format: CondFormat) -> String {
        system_message(&self.as_text(format))
    }
}

/// The system message around a conditioning text. The instruction keeps the
/// numbers out of the reply: they are a steer, not content. The numbers come
/// last: everything before them is the same for every prompt, so a decoder
/// that caches prompt prefixes evaluates only the numbers and what follows.
pub fn system_message(condition: &str) -> String {
    format!(
        "You are Tofy, a helpful assistant. A world model read the user's message and \
         predicted a latent condition for your reply. Use the latent condition to guide the \
         tone, depth and focus of your reply; never mention it or its numbers. \
         Latent condition: {condition}"
    )
}

/// `vector` in one of the three text formats; an empty vector is `empty`.
pub fn format_vector(vector: &[f32], format: CondFormat) -> String {
    if vector.is_empty() {
        return "empty".to_string();
    }
    match format {
        CondFormat::Chunks => chunks(vector),
        CondFormat::Stats => stats(vector),
        CondFormat::Both => format!("{} {}", chunks(vector), stats(vector)),
    }
}

/// Eight chunk means (f64, 3 decimals). Chunk size is len / 8 (integer
/// division); the last chunk runs to the end; an empty chunk is 0.0.
fn chunks(vector: &[f32]) -> String {
    const CHUNKS: usize = 8;
    let size = vector.len() / CHUNKS;
    let mut out = String::from("chunks=[");
    for i in 0..CHUNKS {
        let end = if i == CHUNKS - 1 {
            vector.len()
        } else {
            (i + 1) * size
        };
        let chunk = &vector[(i * size).min(end)..end];
        let mean = if chunk.is_empty() {
            0.0
        } else {
            chunk.iter().map(|&v| f64::from(v)).sum::<f64>() / chunk.len() as f64
        };
        if i > 0 {
            out.push(',');
        }
        write!(out, "{mean:.3}").expect("writing to a String");
    }
    out.push(']');
    out
}

/// Mean, population standard deviation and L2 norm of a vector, in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub std: f64,
    pub l2: f64,
}

impl Summary {
    pub fn of(vector: &[f32]) -> Self {
        let n = vector.len() as f64;
        let mean = vector.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = vector
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let l2 = vector
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        Self {
            mean,
            std: var.sqrt(),
            l2,
        }
    }
}

/// `mean=…,std=…,l2=…,head=[…]`: population std, head = first 8 values.
fn stats(vector: &[f32]) -> String {
    let Summary { mean, std, l2 } = Summary::of(vector);
    let head: Vec<String> = vector.iter().take(8).map(|v| format!("{v:.3}")).collect();
    format!(
        "mean={mean:.4},std={std:.4},l2={l2:.4},head=[{}]",
        head.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_sixteen() {
        let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        assert_eq!(
            format_vector(&v, CondFormat::Chunks),
            "chunks=[0.500,2.500,4.500,6.500,8.500,10.500,12.500,14.500]"
        );
    }

    #[test]
    fn last_chunk_runs_to_the_end_and_short_vectors_have_empty_chunks() {
        // len 10: size 1; chunks 0..6 are single values, chunk 7 is [7, 10).
        let v: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert_eq!(
            format_vector(&v, CondFormat::Chunks),
            "chunks=[0.000,1.000,2.000,3.000,4.000,5.000,6.000,8.000]"
        );
        // len 3: size 0; the first seven chunks are empty, the last holds all.
        assert_eq!(
            format_vector(&[1.0, 2.0, 6.0], CondFormat::Chunks),
            "chunks=[0.000,0.000,0.000,0.000,0.000,0.000,0.000,3.000]"
        );
    }

    #[test]
    fn stats_and_both() {
        let v = [1.0f32, -1.0, 1.0, -1.0];
        assert_eq!(
            format_vector(&v, CondFormat::Stats),
            "mean=0.0000,std=1.0000,l2=2.0000,head=[1.000,-1.000,1.000,-1.000]"
        );
        assert_eq!(
            format_vector(&v, CondFormat::Both),
            "chunks=[0.000,0.000,0.000,0.000,0.000,0.000,0.000,0.000] \
             mean=0.0000,std=1.0000,l2=2.0000,head=[1.000,-1.000,1.000,-1.000]"
        );
    }

    #[test]
    fn empty_vector_and_unknown_name() {
        assert_eq!(format_vector(&[], CondFormat::Both), "empty");
        let err = "vectors".parse::<CondFormat>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown conditioning format 'vectors': use chunks, stats or both"
        );
        assert_eq!("stats".parse::<CondFormat>().unwrap(), CondFormat::Stats);
    }

    #[test]
    fn the_system_message_carries_the_text_exactly() {
        let c = Conditioning {
            vector: vec![0.25; 8],
            world_tokens: 3,
            ablated: false,
        };
        let msg = c.system_message(CondFormat::Chunks);
        assert!(msg.ends_with(
            "Latent condition: chunks=[0.250,0.250,0.250,0.250,0.250,0.250,0.250,0.250]"
        ));
    }
}
