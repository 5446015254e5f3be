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
        Ok(condition_all(&self.world, &[prompt], ablate)?.remove(0))
    }

    /// The conversation the decoder gets: the conditioning system message,
    /// then the user's prompt.
    pub fn messages(&self, conditioning: &Conditioning, prompt: &str) -> Vec<ChatMessage> {
        with_conditioning(
            vec![ChatMessage::new(Role::User, prompt)],
            conditioning.system_message(self.cond_format),
        )
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
