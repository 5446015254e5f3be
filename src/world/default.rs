//! The default world model, compiled into the binary so that `tofy` works
//! on a fresh machine with no model arguments. It is trained on the
//! chitchat corpus by `make world-model`; `models/world/README.md` says how
//! it was made and how it scores against the baselines.

/// Where the default checkpoint lives in the repository (named in messages).
pub const MODEL_PATH: &str = "models/world/model_world_1.51M.safetensors";
/// Where its vocabulary lives in the repository.
pub const VOCAB_PATH: &str = "models/world/vocab_world.txt";

/// The checkpoint's bytes.
pub static MODEL: &[u8] = include_bytes!("../../models/world/model_world_1.51M.safetensors");
/// The vocabulary's bytes.
pub static VOCAB: &[u8] = include_bytes!("../../models/world/vocab_world.txt");
