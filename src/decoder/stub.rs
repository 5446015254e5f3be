//! The stub backend: answers without any model, deterministically, and says
//! so in its reply, so a missing GGUF never looks like a silent model answer.

use std::path::Path;
use std::time::Instant;

use super::{
    Accepted, BackendKind, Decoder, DecoderError, Deferred, FinishReason, GenerateRequest,
    Generation, Prompt, Sink,
};

/// The placeholder decoder.
#[derive(Debug, Default)]
pub struct StubDecoder;

impl StubDecoder {
    /// The reply to a conversation: names the stub and echoes the last user
    /// message, so tests and users can tell it apart from a model.
    pub fn reply(request: &GenerateRequest) -> String {
        let last_user = request.prompt.last_user_text();
        format!(
            "[tofy stub decoder: no GGUF model loaded, this is not a model reply] You said: {last_user}"
        )
    }
}

impl Decoder for StubDecoder {
    fn backend(&self) -> BackendKind {
        BackendKind::Stub
    }

    fn model_path(&self) -> Option<&Path> {
        None
    }

    fn context_size(&self) -> Option<usize> {
        None
    }

    fn submit<'d>(
        &'d self,
        request: &GenerateRequest,
    ) -> Result<Box<dyn Accepted + 'd>, DecoderError> {
        // The stub stands in for a reply, not for a steer it cannot apply.
        if request.control.is_some() {
            return Err(self.unsupported("apply a control vector"));
        }
        let request = request.clone();
        Ok(Box::new(Deferred(move |sink: &mut Sink<'_>| {
            Ok(Self::run(&request, sink))
        })))
    }
}

impl StubDecoder {
    fn run(request: &GenerateRequest, sink: &mut Sink<'_>) -> Generation {
        let start = Instant::now();
        // One "token" per word, so max_new_tokens means the same thing here.
        let reply = Self::reply(request);
        let words: Vec<&str> = reply.split_inclusive(' ').collect();
        let mut scanner = super::stop::StopScanner::new(&request.stop);
        let mut text = String::new();
        let mut first = None;
        let mut finish = FinishReason::Stop;
        let mut count = 0;
        for word in words {
            if count == request.max_new_tokens {
                finish = FinishReason::Length;
                break;
            }
            count += 1;
            let released = scanner.push(word);
            if !released.text.is_empty() {
                first.get_or_insert_with(|| start.elapsed());
                text.push_str(&released.text);
                if sink(&released.text).is_break() {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            if released.stopped {
                break;
            }
        }
        if finish != FinishReason::Cancelled {
            let rest = scanner.finish();
            if !rest.is_empty() {
                text.push_str(&rest);
                let _ = sink(&rest);
            }
        }
        Generation {
            text,
            finish_reason: finish,
            prompt_tokens: prompt_words(&request.prompt),
            completion_tokens: count,
            time_to_first_token: first.unwrap_or_else(|| start.elapsed()),
            cached_tokens: 0,
            prompt_time: None,
            total_time: start.elapsed(),
        }
    }
}

/// The stub's "tokens": words of the text, plus one per embedding row.
fn prompt_words(prompt: &Prompt) -> usize {
    let words = match prompt {
        Prompt::Chat { messages, .. } => messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum(),
        Prompt::Raw(_) => prompt
            .plain_text()
            .map_or(0, |text| text.split_whitespace().count()),
    };
    words + prompt.embedding_rows()
}
