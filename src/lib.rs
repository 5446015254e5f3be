//! Tofy runtime: a JEPA-style world model that reads a prompt and predicts a
//! latent for the reply, and a local llama.cpp decoder that writes the reply
//! steered by that latent.
//!
//! Module map:
//! - [`world`]: world-model checkpoints, vocabulary, tokenizer and the forward
//!   pass that turns prompts into conditioning vectors.
//! - [`data`]: conversation pairs files and the chitchat corpus converter.
//! - [`conditioning`]: the conditioning vector and its text formats.
//! - [`decoder`]: the `Decoder` trait and its llama.cpp, subprocess and stub
//!   backends, model discovery and the `JEPA_DECODER_*` settings.
//! - [`engine`]: prompt → world model → conditioning → decoder, shared by the
//!   CLI and the server.
//! - [`fault`]: panic messages, and the test-only fault-injection points.
//! - [`fuzzing`]: the invariants the fuzz targets (fuzz/) and their corpus replay check.
//! - [`fit_projector`]: ridge regression from world vectors to target rows.
//! - [`projector`]: world vector → embedding rows for prefix conditioning.
//! - [`server`]: the OpenAI-compatible HTTP server (`tofy serve`).
//! - [`eval`]: held-out evaluation of a world model against baselines.
//! - [`eval_conditioning`]: does the conditioning lower the decoder's NLL of
//!   the true reply (paired modes, bootstrap intervals)?
//! - [`train`] (feature `train`): the candle trainer and reference model.
//! - [`exit`]: leaving without destructors when a native thread cannot stop.
//! - [`cli`]: the command-line surface (`tofy condition`, ...), shared by the
//!   binary and the integration tests.

pub mod atomic;
pub mod cli;
pub mod conditioning;
pub mod data;
pub mod decoder;
pub mod engine;
pub mod eval;
pub mod eval_conditioning;
pub mod exit;
pub mod fault;
pub mod fit_projector;
#[doc(hidden)]
pub mod fuzzing;
pub mod projector;
pub mod server;
#[cfg(feature = "train")]
pub mod train;
pub mod world;
