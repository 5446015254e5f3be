//! Tofy runtime: a JEPA-style world model that reads a prompt and predicts a
//! latent for the reply, and (in later modules) a local llama.cpp decoder that
//! writes the reply steered by that latent.
//!
//! Module map:
//! - [`world`]: world-model checkpoints, vocabulary, tokenizer and the forward
//!   pass that turns prompts into conditioning vectors.
//! - [`cli`]: the command-line surface (`tofy condition`, ...), shared by the
//!   binary and the integration tests.

pub mod cli;
pub mod world;
