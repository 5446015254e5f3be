//! The agent pipeline shared by the CLI and the server: a prompt goes
//! through the world model, its conditioning reaches the decoder through the
//! channel [`CondMode`] picks, and the decoder writes the reply.
//!
//! [`Engine::steer`] turns the text the world model reads (and a request's
//! own choices) into a [`Steer`]; [`Engine::apply`] puts it into a
//! conversation. Both callers go through these two, so every conditioning
//! mode lives here and only here. World-model calls go through one
//! [`WorldBatcher`], so concurrent server requests share forward passes.

mod world_batch;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::conditioning::{CondFormat, CondMode, Conditioning, system_message};
use crate::decoder::{
    ChatMessage, ControlError, ControlVector, Decoder, DecoderError, EMBEDDINGS_MARKER, Embeddings,
    EmbeddingsError, GenerateRequest, Generation, Prompt, Role, Sampling, Sink,
};
use crate::projector::{Projector, ProjectorError};
use crate::world::{WorldError, WorldModel};
pub use world_batch::{MAX_BATCH, WorldBatcher};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    World(#[from] WorldError),
    #[error(transparent)]
    Decoder(#[from] DecoderError),
    #[error(transparent)]
    Projector(#[from] ProjectorError),
    #[error(transparent)]
    Embeddings(#[from] EmbeddingsError),
    #[error("world model: {0}")]
    WorldThread(String),
    #[error(
        "prefix conditioning needs a projector for this decoder ({model}, rows of {width}): the embedded one is for SmolLM2-135M-Instruct; pass --projector FILE (TOFY_PROJECTOR)"
    )]
    NoProjector { model: String, width: usize },
    #[error(
        "prefix conditioning needs embedding input, which the {backend} backend does not take; use the llama backend (JEPA_DECODER_BACKEND=llama)"
    )]
    NoEmbeddingInput { backend: &'static str },
    #[error(
        "ablate_conditioning zeroes a conditioning vector, and the caller's own embedding rows have none; send one or the other"
    )]
    AblateRows,
    #[error(
        "cvec conditioning needs a control map: make one with `tofy fit-control` and pass --control FILE (TOFY_CONTROL)"
    )]
    NoControl,
    #[error(
        "cvec conditioning needs control vectors, which the {backend} backend does not apply; use the llama backend (JEPA_DECODER_BACKEND=llama)"
    )]
    NoControlInput { backend: &'static str },
    #[error("control map {path}: {source}")]
    ControlMap {
        path: String,
        #[source]
        source: ControlError,
    },
}

/// How the engine conditions unless a request says otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct CondSettings {
    /// `None`: the engine picks ([`default_mode`]).
    pub mode: Option<CondMode>,
    pub format: CondFormat,
}

/// The mode when none was chosen: `prefix` where the decoder takes
/// embedding rows (`projector` is then the one that fits it) and a
/// projector was made for its GGUF and for the world model's vectors (one
/// given, checked to fit the decoder; or the embedded one, made for the
/// GGUF of that file name), else the seed's `text`. On held-out chitchat
/// `prefix` is the mode under which the decoder most expects the true reply
/// (docs/conditioning.md, issue 24 rung 5); `text` needs no projector, so it
/// stays for every other setup.
pub fn default_mode(
    projector: Option<&Projector>,
    given: bool,
    model: Option<&Path>,
    bridge_dim: usize,
) -> CondMode {
    let Some(projector) = projector.filter(|p| p.bridge_dim() == bridge_dim) else {
        return CondMode::Text;
    };
    let made_for_model = model
        .and_then(Path::file_name)
        .is_some_and(|name| name.to_str() == Some(projector.gguf_name()));
    if given || made_for_model {
        CondMode::Prefix
    } else {
        CondMode::Text
    }
}

/// One request's conditioning choices over the engine's settings.
#[derive(Debug, Clone, Default)]
pub struct TurnOptions {
    pub mode: Option<CondMode>,
    pub format: Option<CondFormat>,
    /// Replace the world vector by zeros.
    pub ablate: bool,
    /// A world vector given by the caller: the world model does not run,
    /// the vector goes through the projector (prefix mode).
    pub vector: Option<Vec<f32>>,
    /// Rows given by the caller, used as they are in place of the
    /// projector's (prefix mode).
    pub rows: Option<Embeddings>,
}

/// What a turn's conditioning is, ready to go into a conversation.
#[derive(Debug, Clone)]
pub struct Steer {
    pub mode: CondMode,
    pub format: CondFormat,
    /// The world model's output, when it ran (or the caller's vector).
    pub conditioning: Option<Conditioning>,
    /// Prefix mode: the rows that take the numbers' place.
    pub rows: Option<Embeddings>,
    /// Cvec mode: the control vector added to the decoder's residual stream.
    pub control: Option<ControlVector>,
    /// World-model time (tokenize + forward; zero when it did not run).
    pub world_time: Duration,
}

impl Steer {
    /// Embedding rows in the prompt (K of prefix mode, else 0).
    pub fn k(&self) -> usize {
        self.rows.as_ref().map_or(0, Embeddings::n_rows)
    }

    /// Whether the conversation gets a conditioning message at all.
    pub fn is_active(&self) -> bool {
        match self.mode {
            CondMode::Text => self.conditioning.is_some(),
            CondMode::Prefix => self.rows.is_some(),
            CondMode::Cvec => self.control.is_some(),
            CondMode::None => false,
        }
    }
}

/// One agent turn.
#[derive(Debug, Clone)]
pub struct AgentRequest {
    pub prompt: String,
    pub max_new_tokens: usize,
    pub turn: TurnOptions,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// Set to give the generation up (Ctrl-C): it ends as cancelled.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// The conditioning the decoder saw, and what it wrote.
#[derive(Debug, Clone)]
pub struct AgentReply {
    pub steer: Steer,
    pub generation: Generation,
}

/// World model + decoder + how the conditioning reaches the decoder.
pub struct Engine {
    world: Arc<WorldModel>,
    batcher: WorldBatcher,
    decoder: Box<dyn Decoder>,
    /// A turn's mode and text format unless it names its own.
    mode: CondMode,
    format: CondFormat,
    /// For prefix mode; `None` when no projector fits the decoder.
    projector: Option<Projector>,
    /// For cvec mode: a control map and the strength of its vectors.
    control: Option<(Projector, f32)>,
}

impl Engine {
    /// The engine, with `projector` (or, with none given, the embedded
    /// one where it fits the decoder), and the mode `settings` name or else
    /// [`default_mode`]'s. An error when the default mode is `prefix` and
    /// it cannot run, or a given projector does not fit.
    pub fn new(
        world: WorldModel,
        decoder: Box<dyn Decoder>,
        settings: CondSettings,
        projector: Option<Projector>,
    ) -> Result<Self, EngineError> {
        let model = decoder
            .model_path()
            .map_or_else(|| "(no model)".to_string(), |p| p.display().to_string());
        let given = projector.is_some();
        let projector = match (projector, decoder.input_width()) {
            (Some(p), Some(width)) => {
                p.check_width(width, &model)?;
                Some(p)
            }
            (None, Some(width)) => Some(Projector::embedded()).filter(|p| p.n_embd() == width),
            (_, None) => None,
        };
        let mode = settings.mode.unwrap_or_else(|| {
            default_mode(
                projector.as_ref(),
                given,
                decoder.model_path(),
                world.config().bridge_dim,
            )
        });
        let world = Arc::new(world);
        let engine = Self {
            batcher: WorldBatcher::start(Arc::clone(&world)).map_err(DecoderError::Io)?,
            world,
            decoder,
            mode,
            format: settings.format,
            projector,
            control: None,
        };
        if mode == CondMode::Prefix {
            engine.prefix_projector()?;
        }
        Ok(engine)
    }

    /// The engine with a control map for cvec mode (its vectors added at
    /// `strength`), checked against the decoder; without one, an error when
    /// the default mode is `cvec`.
    pub fn with_control(mut self, control: Option<(Projector, f32)>) -> Result<Self, EngineError> {
        if let Some((map, strength)) = &control {
            let Some((n_embd, n_layer)) = self.decoder.control_shape() else {
                return Err(EngineError::NoControlInput {
                    backend: self.decoder.backend().name(),
                });
            };
            // A zero world vector's control vector has the map's shape.
            let probe = map.control(&vec![0.0; map.bridge_dim()], *strength)?;
            probe
                .check(n_embd, n_layer)
                .map_err(|source| EngineError::ControlMap {
                    path: map.source().to_string(),
                    source,
                })?;
        }
        self.control = control;
        if self.mode == CondMode::Cvec {
            self.control_map()?;
        }
        Ok(self)
    }

    /// The control map and strength, or why cvec mode cannot run here.
    pub fn control_map(&self) -> Result<(&Projector, f32), EngineError> {
        if self.decoder.control_shape().is_none() {
            return Err(EngineError::NoControlInput {
                backend: self.decoder.backend().name(),
            });
        }
        self.control
            .as_ref()
            .map(|(map, strength)| (map, *strength))
            .ok_or(EngineError::NoControl)
    }

    pub fn world(&self) -> &WorldModel {
        &self.world
    }

    pub fn decoder(&self) -> &dyn Decoder {
        self.decoder.as_ref()
    }

    /// The mode of a turn that names none: the one chosen, or
    /// [`default_mode`]'s.
    pub fn mode(&self) -> CondMode {
        self.mode
    }

    /// The text format of a turn that names none.
    pub fn format(&self) -> CondFormat {
        self.format
    }

    pub fn projector(&self) -> Option<&Projector> {
        self.projector.as_ref()
    }

    /// The projector, or why prefix mode cannot run here.
    pub fn prefix_projector(&self) -> Result<&Projector, EngineError> {
        let Some(width) = self.decoder.input_width() else {
            return Err(EngineError::NoEmbeddingInput {
                backend: self.decoder.backend().name(),
            });
        };
        self.projector
            .as_ref()
            .ok_or_else(|| EngineError::NoProjector {
                model: self
                    .decoder
                    .model_path()
                    .map_or_else(String::new, |p| p.display().to_string()),
                width,
            })
    }

    /// A turn's conditioning: the world model reads `world_prompt` (unless
    /// the caller gave rows or a vector), and the mode decides what of it
    /// the decoder gets. An empty `world_prompt` (no user text) leaves the
    /// turn unconditioned.
    pub fn steer(&self, world_prompt: &str, turn: &TurnOptions) -> Result<Steer, EngineError> {
        let given = turn.rows.is_some() || turn.vector.is_some();
        let mode = if given {
            CondMode::Prefix
        } else {
            turn.mode.unwrap_or(self.mode)
        };
        let mut steer = Steer {
            mode,
            format: turn.format.unwrap_or(self.format),
            conditioning: None,
            rows: None,
            control: None,
            world_time: Duration::ZERO,
        };
        if let Some(rows) = &turn.rows {
            if turn.ablate {
                return Err(EngineError::AblateRows);
            }
            if let Some(width) = self.decoder.input_width() {
                rows.check_width(width)?;
            } else {
                self.prefix_projector()?;
            }
            steer.rows = Some(rows.clone());
            return Ok(steer);
        }
        if let Some(vector) = &turn.vector {
            let vector = if turn.ablate {
                vec![0.0; vector.len()]
            } else {
                vector.clone()
            };
            steer.rows = Some(self.prefix_projector()?.project(&vector)?);
            steer.conditioning = Some(Conditioning {
                vector,
                world_tokens: 0,
                ablated: turn.ablate,
            });
            return Ok(steer);
        }
        if mode == CondMode::None || world_prompt.trim().is_empty() {
            return Ok(steer);
        }
        let projector = match mode {
            CondMode::Prefix => Some(self.prefix_projector()?),
            _ => None,
        };
        let control = match mode {
            CondMode::Cvec => Some(self.control_map()?),
            _ => None,
        };
        let start = Instant::now();
        let conditioning = self
            .batcher
            .condition(world_prompt, turn.ablate)
            .map_err(EngineError::WorldThread)?;
        steer.world_time = start.elapsed();
        if let Some(projector) = projector {
            steer.rows = Some(projector.project(&conditioning.vector)?);
        }
        if let Some((map, strength)) = control {
            steer.control = Some(map.control(&conditioning.vector, strength)?);
        }
        steer.conditioning = Some(conditioning);
        Ok(steer)
    }

    /// `conversation` with the turn's conditioning message in place (see
    /// [`with_conditioning`]): numbers in text mode, embedding rows at the
    /// same place in prefix mode, nothing in `none` and `cvec` modes (the
    /// control vector goes with the request: [`Steer::control`]).
    pub fn apply(&self, steer: &Steer, conversation: Vec<ChatMessage>) -> Prompt {
        match (steer.mode, &steer.conditioning, &steer.rows) {
            (CondMode::Text, Some(c), _) => Prompt::chat(with_conditioning(
                conversation,
                c.system_message(steer.format),
            )),
            (CondMode::Prefix, _, Some(rows)) => Prompt::Chat {
                messages: with_conditioning(conversation, system_message(EMBEDDINGS_MARKER)),
                embeddings: vec![rows.clone()],
            },
            _ => Prompt::chat(conversation),
        }
    }

    /// Stops the native threads (the llama.cpp worker first, then the
    /// world model's), each within `within`: see [`Decoder::shutdown`].
    /// After an error something still runs, and the process must leave
    /// without destructors (`crate::exit::now`).
    pub fn shutdown(&self, within: Duration) -> Result<(), DecoderError> {
        self.decoder.shutdown(within)?;
        if !self.batcher.shutdown(within) {
            return Err(DecoderError::StopTimeout {
                what: "the world-model thread",
                within,
            });
        }
        Ok(())
    }

    /// Runs one turn, streaming the reply into `sink`.
    pub fn infer(
        &self,
        request: &AgentRequest,
        sink: &mut Sink<'_>,
    ) -> Result<AgentReply, EngineError> {
        let steer = self.steer(&request.prompt, &request.turn)?;
        let conversation = vec![ChatMessage::new(Role::User, request.prompt.as_str())];
        let generate = GenerateRequest {
            stop: request.stop.clone(),
            prompt: self.apply(&steer, conversation),
            control: steer.control.clone(),
            cancel: request.cancel.clone(),
            ..GenerateRequest::chat(Vec::new(), request.max_new_tokens, request.sampling.clone())
        };
        let generation = self.decoder.generate(&generate, sink)?;
        Ok(AgentReply { steer, generation })
    }
}

/// The conditioning of each prompt, from one batched forward pass (zeros
/// when ablated).
pub fn condition_all(
    world: &WorldModel,
    prompts: &[&str],
    ablate: bool,
) -> Result<Vec<Conditioning>, WorldError> {
    let outputs = if ablate {
        world.ablated(prompts)?
    } else {
        world.condition_batch(prompts)?
    };
    Ok(outputs
        .into_iter()
        .map(|c| Conditioning {
            vector: c.vector,
            world_tokens: c.tokens,
            ablated: ablate,
        })
        .collect())
}

/// `conversation` with the conditioning system message just before its
/// latest user message (after the leading system messages when there is
/// none). Not first: the conditioning changes with every user turn, and
/// everything before it (the client's system prompt, earlier turns) then
/// stays a stable prefix whose KV cache the decoder reuses.
pub fn with_conditioning(mut conversation: Vec<ChatMessage>, system: String) -> Vec<ChatMessage> {
    let at = conversation
        .iter()
        .rposition(|m| m.role == Role::User)
        .unwrap_or_else(|| {
            conversation
                .iter()
                .take_while(|m| m.role == Role::System)
                .count()
        });
    conversation.insert(at, ChatMessage::new(Role::System, system));
    conversation
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prefix where a projector was made for the GGUF and the world
    /// model's vectors; the seed's text everywhere else.
    #[test]
    fn the_default_mode_is_prefix_only_where_a_projector_was_made_for_the_setup() {
        let embedded = Projector::embedded();
        let made_for = Path::new("/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let other = Path::new("/models/other-576-wide.gguf");
        let bridge = embedded.bridge_dim();
        let mode = |p, given, model, bridge| default_mode(p, given, model, bridge);
        assert_eq!(embedded.gguf_name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(
            mode(Some(&embedded), false, Some(made_for), bridge),
            CondMode::Prefix
        );
        assert_eq!(
            mode(Some(&embedded), false, Some(other), bridge),
            CondMode::Text
        );
        assert_eq!(
            mode(Some(&embedded), true, Some(other), bridge),
            CondMode::Prefix
        );
        assert_eq!(
            mode(Some(&embedded), false, Some(made_for), 24),
            CondMode::Text
        );
        assert_eq!(mode(Some(&embedded), true, Some(other), 24), CondMode::Text);
        assert_eq!(mode(None, false, Some(made_for), bridge), CondMode::Text);
        assert_eq!(mode(Some(&embedded), false, None, bridge), CondMode::Text);
    }

    #[test]
    fn conditioning_goes_right_before_the_latest_user_turn() {
        let m = |role, text: &str| ChatMessage::new(role, text);
        let conversation = vec![
            m(Role::System, "rules"),
            m(Role::User, "one"),
            m(Role::Assistant, "two"),
            m(Role::User, "three"),
            m(Role::Tool, "result"),
        ];
        let out = with_conditioning(conversation, "cond".into());
        let roles: Vec<_> = out.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(roles, ["rules", "one", "two", "cond", "three", "result"]);
        let only_system = with_conditioning(vec![m(Role::System, "rules")], "cond".into());
        assert_eq!(only_system[1].content, "cond");
    }
}
