//! The agent pipeline shared by the CLI and the server: a prompt goes
//! through the world model, its conditioning vector is written into the
//! system message, and the decoder writes the reply.

use std::time::{Duration, Instant};

use crate::conditioning::{CondFormat, Conditioning};
use crate::decoder::{
    ChatMessage, Decoder, DecoderError, GenerateRequest, Generation, Role, Sampling, Sink,
};
use crate::world::{WorldError, WorldModel};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    World(#[from] WorldError),
    #[error(transparent)]
    Decoder(#[from] DecoderError),
}

/// One agent turn.
#[derive(Debug, Clone)]
pub struct AgentRequest {
    pub prompt: String,
    pub max_new_tokens: usize,
    pub ablate_conditioning: bool,
    pub sampling: Sampling,
    pub stop: Vec<String>,
}

/// The conditioning the decoder saw, and what it wrote.
#[derive(Debug, Clone)]
pub struct AgentReply {
    pub conditioning: Conditioning,
    pub generation: Generation,
    /// World-model time (tokenize + forward).
    pub world_time: Duration,
}

/// World model + decoder + how the conditioning is written.
pub struct Engine {
    world: WorldModel,
    decoder: Box<dyn Decoder>,
    cond_format: CondFormat,
}

impl Engine {
    pub fn new(world: WorldModel, decoder: Box<dyn Decoder>, cond_format: CondFormat) -> Self {
        Self {
            world,
            decoder,
            cond_format,
        }
    }

    pub fn world(&self) -> &WorldModel {
        &self.world
    }

    pub fn decoder(&self) -> &dyn Decoder {
        self.decoder.as_ref()
    }

    pub fn cond_format(&self) -> CondFormat {
        self.cond_format
    }

    /// The world model's conditioning for `prompt` (zeros when ablated).
    pub fn condition(&self, prompt: &str, ablate: bool) -> Result<Conditioning, WorldError> {
        let prompts = [prompt];
        let mut result = if ablate {
            self.world.ablated(&prompts)?
        } else {
            self.world.condition_batch(&prompts)?
        };
        let c = result.remove(0);
        Ok(Conditioning {
            vector: c.vector,
            world_tokens: c.tokens,
            ablated: ablate,
        })
    }

    /// The conversation the decoder gets: the conditioning system message,
    /// then the user's prompt.
    pub fn messages(&self, conditioning: &Conditioning, prompt: &str) -> Vec<ChatMessage> {
        vec![
            ChatMessage::new(Role::System, conditioning.system_message(self.cond_format)),
            ChatMessage::new(Role::User, prompt),
        ]
    }

    /// Runs one turn, streaming the reply into `sink`.
    pub fn infer(
        &self,
        request: &AgentRequest,
        sink: &mut Sink<'_>,
    ) -> Result<AgentReply, EngineError> {
        let start = Instant::now();
        let conditioning = self.condition(&request.prompt, request.ablate_conditioning)?;
        let world_time = start.elapsed();
        let generate = GenerateRequest {
            stop: request.stop.clone(),
            ..GenerateRequest::chat(
                self.messages(&conditioning, &request.prompt),
                request.max_new_tokens,
                request.sampling.clone(),
            )
        };
        let generation = self.decoder.generate(&generate, sink)?;
        Ok(AgentReply {
            conditioning,
            generation,
            world_time,
        })
    }
}
