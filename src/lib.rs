//! Tofy runtime: a JEPA-style world model that reads a prompt and predicts a
//! latent for the reply, and (in later modules) a local llama.cpp decoder that
//! writes the reply steered by that latent.
//!
//! Module map:
//! - [`world`]: world-model checkpoints, vocabulary, tokenizer and the forward
//!   pass that turns prompts into conditioning vectors.
//! - [`data`]: conversation pairs files and the chitchat corpus converter.
//! - [`eval`]: held-out evaluation of a world model against baselines.
//! - [`train`] (feature `train`): the candle trainer and reference model.
//! - [`cli`]: the command-line surface (`tofy condition`, ...), shared by the
//!   binary and the integration tests.

pub mod cli;
pub mod data;
pub mod eval;
#[cfg(feature = "train")]
pub mod train;
pub mod world;
