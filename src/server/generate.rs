//! `POST /v1/chat/completions` and `POST /v1/completions`: validate the
//! request, run it on a blocking thread, and answer with one JSON object or
//! an SSE stream in OpenAI's chunk format.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::api::{
    ChatRequest, CompletionRequest, ConditioningReport, Content, GenerationOptions, PromptField,
    RequestMessage, TofyOptions, ToolCall, Usage,
};
use super::embeds::{self, Limits};
use super::peer::{self, PeerSocket};
use super::tools::{self, Parsed, ToolCallParser};
use super::{Admission, ApiError, MODEL_ID, State, read_json};
use crate::conditioning::CondMode;
use crate::decoder::{
    ChatMessage, DecoderError, FinishReason, GenerateRequest, Generation, Prompt, Role, Sampling,
    Segment,
};
use crate::engine::{Steer, TurnOptions};

/// The largest magnitude a caller's `tofy.conditioning` value may have.
const MAX_CONDITIONING: f32 = 1e6;

/// What a handler hands to the blocking thread.
struct Job {
    input: Input,
    request: GenerateRequest,
    turn: TurnOptions,
}

enum Input {
    /// The conversation, and the text the world model reads (the latest
    /// user turn).
    Chat {
        conversation: Vec<ChatMessage>,
        world_prompt: String,
        /// The tool definitions for the system message, when offered.
        tools: Option<String>,
    },
    /// Embedding rows and/or text, continued as is. A raw prompt has no
    /// system message to carry the conditioning, so the world model does
    /// not run.
    Raw(Vec<Segment>),
}

/// What comes back over the channel.
enum Event {
    Piece(String),
    Done(Result<Outcome, ApiError>),
}

struct Outcome {
    generation: Generation,
    /// A chat turn's conditioning (boxed: it is large, and most events
    /// are pieces).
    steer: Option<Box<Steer>>,
}

/// How replies are shaped, fixed when the request is read.
struct Shape {
    id: String,
    created: u64,
    chat: bool,
    tools: bool,
    include_usage: bool,
    /// `tofy.return_conditioning` on a chat request.
    report: bool,
}

pub(crate) async fn chat(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    let mut body: ChatRequest = read_json(&req, payload).await?;
    let tofy = body.options.tofy.take().unwrap_or_default();
    let report = tofy.return_conditioning;
    let turn = turn_options(&state, tofy)?;
    let tools =
        !body.tools.is_empty() && body.tool_choice.as_ref().and_then(Value::as_str) != Some("none");
    let conversation = conversation(body.messages)?;
    let world_prompt = conversation
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let input = Input::Chat {
        conversation,
        world_prompt,
        tools: tools.then(|| tools::tools_prompt(&body.tools)),
    };
    respond(state, &req, body.options, input, turn, report, true, tools).await
}

/// A chat request's conditioning choices, checked before it is queued.
fn turn_options(state: &State, tofy: TofyOptions) -> Result<TurnOptions, ApiError> {
    let rows = match &tofy.prefix_embeddings {
        Some(value) => Some(embeds::parse(
            value,
            &embed_limits(state)?,
            "tofy.prefix_embeddings",
        )?),
        None => None,
    };
    // World vectors are of order 1; a value far beyond that can only
    // overflow the projection.
    if let Some(vector) = &tofy.conditioning
        && let Some(i) = vector
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_CONDITIONING)
    {
        return Err(ApiError::invalid_param(
            "tofy.conditioning",
            format!(
                "tofy.conditioning[{i}] is not a finite number within ±{MAX_CONDITIONING:e}; send the world model's vector (values of order 1)"
            ),
        ));
    }
    Ok(TurnOptions {
        mode: tofy.cond_mode.map(|m| m.0),
        format: tofy.cond_format.map(|f| f.0),
        ablate: tofy.ablate_conditioning,
        vector: tofy.conditioning,
        rows,
    })
}

/// What embedding rows must fit: the decoder's input width and context.
fn embed_limits(state: &State) -> Result<Limits, ApiError> {
    let decoder = state.decoder()?;
    let width = decoder.input_width().ok_or_else(|| {
        ApiError::invalid(format!(
            "the {} decoder backend does not take embedding rows; run the server with the llama backend",
            decoder.backend().name()
        ))
    })?;
    Ok(Limits {
        width,
        context: decoder.context_size().unwrap_or(usize::MAX),
    })
}

pub(crate) async fn completions(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    let mut body: CompletionRequest = read_json(&req, payload).await?;
    let text = match body.prompt {
        None => String::new(),
        Some(PromptField::One(text)) => text,
        Some(PromptField::Many(mut texts)) if texts.len() == 1 => texts.remove(0),
        Some(PromptField::Many(_)) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "only one prompt per request is supported; send a string or a list of one",
            ));
        }
    };
    let mut segments = Vec::with_capacity(2);
    if let Some(value) = &body.prompt_embeds {
        let rows = embeds::parse(value, &embed_limits(&state)?, "prompt_embeds")?;
        segments.push(Segment::Embeddings(rows));
    }
    if !text.is_empty() {
        segments.push(Segment::Text(text));
    }
    if segments.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt is empty; send some text (or prompt_embeds)",
        ));
    }
    // A raw prompt carries no conditioning message.
    body.options.tofy = None;
    let input = Input::Raw(segments);
    respond(
        state,
        &req,
        body.options,
        input,
        TurnOptions::default(),
        false,
        false,
        false,
    )
    .await
}

/// The OpenAI conversation as decoder messages, earlier tool calls and
/// results in the model's own syntax.
fn conversation(messages: Vec<RequestMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages is empty; send at least one message",
        ));
    }
    let mut out = Vec::with_capacity(messages.len() + 2);
    for (i, message) in messages.into_iter().enumerate() {
        let text = content_text(message.content, i)?;
        let (role, content) = match message.role.as_str() {
            "system" | "developer" => (Role::System, text),
            "user" => (Role::User, text),
            "assistant" => {
                let mut content = text;
                for call in &message.tool_calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&tools::render_call(
                        &call.function.name,
                        &call.function.arguments,
                    ));
                }
                (Role::Assistant, content)
            }
            // Results go back in a user turn: few chat templates know a tool role.
            "tool" | "function" => (Role::Tool, tools::render_result(&text)),
            other => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!(
                        "messages[{i}].role '{other}' is not one of system, developer, user, assistant, tool"
                    ),
                ));
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

/// The tool definitions appended to the first system message (or in one of
/// their own), before anything that changes per turn.
fn offer_tools(conversation: &[ChatMessage], offer: &str) -> Vec<ChatMessage> {
    let mut out = conversation.to_vec();
    match out.first_mut() {
        Some(first) if first.role == Role::System => {
            first.content.push_str("\n\n");
            first.content.push_str(offer);
        }
        _ => out.insert(0, ChatMessage::new(Role::System, offer)),
    }
    out
}

fn content_text(content: Option<Content>, index: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!(
                                "messages[{index}] has a '{kind}' content part; only text is supported"
                            ),
                        ));
                    }
                }
            }
            Ok(text)
        }
    }
}

/// Sampling and limits from the request, over the server's defaults.
fn generate_request(
    state: &State,
    options: &mut GenerationOptions,
    prompt: Prompt,
) -> Result<GenerateRequest, ApiError> {
    if options.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid_param(
            "n",
            "n must be 1: one choice per request is supported",
        ));
    }
    let max_tokens = match options.max_completion_tokens.or(options.max_tokens) {
        None => state.max_tokens,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("max_tokens is {n}; it must be at least 1"),
            ));
        }
    };
    let mut sampling: Sampling = state.sampling.clone();
    let check = |param: &'static str, value: Option<f32>, lo: f32, hi: f32| match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::invalid_param(
            param,
            format!("{param} is {v}; it must be between {lo} and {hi}"),
        )),
        other => Ok(other),
    };
    if let Some(t) = check("temperature", options.temperature, 0.0, 2.0)? {
        sampling.temperature = t;
    }
    if let Some(p) = check("top_p", options.top_p, 0.0, 1.0)? {
        sampling.top_p = p;
    }
    if let Some(p) = check("presence_penalty", options.presence_penalty, -2.0, 2.0)? {
        sampling.presence_penalty = p;
    }
    if let Some(p) = check("frequency_penalty", options.frequency_penalty, -2.0, 2.0)? {
        sampling.frequency_penalty = p;
    }
    if let Some(seed) = options.seed {
        // OpenAI seeds are 64-bit; llama.cpp's are 32.
        sampling.seed = Some(seed as u32);
    }
    Ok(GenerateRequest {
        prompt,
        max_new_tokens: max_tokens,
        sampling,
        stop: options
            .stop
            .take()
            .map(|s| s.into_vec())
            .unwrap_or_default(),
        ignore_eos: options.ignore_eos,
        cancel: None,
        control: None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    state: web::Data<State>,
    req: &HttpRequest,
    mut options: GenerationOptions,
    input: Input,
    turn: TurnOptions,
    report: bool,
    chat: bool,
    tools: bool,
) -> Result<HttpResponse, ApiError> {
    // The prompt is filled in on the blocking thread, after the world model.
    let request = generate_request(&state, &mut options, Prompt::Raw(Vec::new()))?;
    let shape = Shape {
        id: format!(
            "{}-{}",
            if chat { "chatcmpl" } else { "cmpl" },
            uuid::Uuid::new_v4().simple()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        chat,
        tools,
        include_usage: options.stream_options.is_some_and(|o| o.include_usage),
        report: report && chat,
    };
    state.decoder()?;
    let admission = state.clone().into_inner().admit()?;
    let mut job = Job {
        input,
        request,
        turn,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // A client that leaves mid-stream drops `rx` (with its stream); one
    // that leaves before anything was written is seen on its socket. The
    // decoder then gives the request up wherever it is, queued included.
    let cancel = Arc::new(AtomicBool::new(false));
    job.request.cancel = Some(Arc::clone(&cancel));
    let watch = tx.clone();
    let socket = PeerSocket::of(req);
    actix_web::rt::spawn(async move {
        let closed = std::pin::pin!(watch.closed());
        let gone = std::pin::pin!(peer::hung_up(socket));
        // `closed` first: once the reply is dropped the socket may be
        // closed and its descriptor reused, and must not be peeked at.
        futures_util::future::select(closed, gone).await;
        cancel.store(true, Ordering::Relaxed);
    });
    let worker_state = state.clone().into_inner();
    actix_web::rt::task::spawn_blocking(move || execute(&worker_state, job, &tx, admission));
    // Nothing is sent before the first event, so that a prompt the decoder
    // refuses (too long for the context) is still an HTTP error.
    let first = rx
        .recv()
        .await
        .ok_or_else(|| ApiError::internal("the generation thread stopped"))?;
    if let Event::Done(Err(mut err)) = first {
        // A raw prompt's errors are about `prompt`, not `messages`.
        if !chat && err.param == Some("messages") {
            err.param = Some("prompt");
        }
        return Err(err);
    }
    if options.stream {
        let stream = Sse {
            rx,
            first: Some(first),
            shape,
            parser: ToolCallParser::default(),
            calls: 0,
            started: false,
            done: false,
        };
        let body = futures_util::stream::unfold(stream, |mut s| async move {
            let bytes = s.next_bytes().await?;
            Some((Ok::<_, actix_web::Error>(bytes), s))
        });
        Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(body))
    } else {
        let mut text = String::new();
        let mut event = first;
        let outcome = loop {
            match event {
                Event::Piece(piece) => text.push_str(&piece),
                Event::Done(result) => break result?,
            }
            event = rx
                .recv()
                .await
                .ok_or_else(|| ApiError::internal("the generation thread stopped"))?;
        };
        Ok(HttpResponse::Ok().json(whole_reply(&shape, &text, &outcome)))
    }
}

/// The blocking part: world model, then the decoder, pieces sent as they
/// come. A closed channel (the client left) cancels the generation.
fn execute(state: &Arc<State>, job: Job, tx: &mpsc::UnboundedSender<Event>, admission: Admission) {
    let result = run(state, job, tx);
    // Free the place first: a client that sends its next request the moment
    // this one ends must find it free.
    drop(admission);
    let _ = tx.send(Event::Done(result));
}

fn run(state: &State, job: Job, tx: &mpsc::UnboundedSender<Event>) -> Result<Outcome, ApiError> {
    let engine = state.engine()?;
    let Job {
        input,
        mut request,
        turn,
    } = job;
    let mut sink = |piece: &str| {
        if tx.send(Event::Piece(piece.to_string())).is_ok() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    };
    let (conversation, world_prompt, tools) = match input {
        Input::Raw(segments) => {
            request.prompt = Prompt::Raw(segments);
            let generation = engine.decoder().generate(&request, &mut sink)?;
            return Ok(state.finished(generation, None));
        }
        Input::Chat {
            conversation,
            world_prompt,
            tools,
        } => (conversation, world_prompt, tools),
    };
    let steer = engine.steer(&world_prompt, &turn)?;
    request.control = steer.control.clone();
    let prompt = |offer: Option<&str>| {
        let messages =
            offer.map_or_else(|| conversation.clone(), |o| offer_tools(&conversation, o));
        engine.apply(&steer, messages)
    };
    request.prompt = prompt(tools.as_deref());
    let generation = match engine.decoder().generate(&request, &mut sink) {
        // Tool definitions can be long (OpenCode's are ~5k tokens): when
        // they push the prompt past the context, the conversation runs
        // without them, as it would with a template that ignores tools.
        // The error comes before any output, so nothing was sent yet.
        Err(DecoderError::ContextExceeded { .. }) if tools.is_some() => {
            request.prompt = prompt(None);
            engine.decoder().generate(&request, &mut sink)?
        }
        other => other?,
    };
    Ok(state.finished(generation, Some(Box::new(steer))))
}

impl State {
    fn finished(&self, generation: Generation, steer: Option<Box<Steer>>) -> Outcome {
        self.metrics.record_generation(&generation);
        Outcome { generation, steer }
    }
}

fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        _ if called => "tool_calls",
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage(g: &Generation) -> Usage {
    Usage::new(g.prompt_tokens, g.completion_tokens, g.cached_tokens)
}

fn report(shape: &Shape, outcome: &Outcome) -> Option<Value> {
    let steer = outcome.steer.as_deref().filter(|_| shape.report)?;
    let c = steer.conditioning.as_ref();
    let report = ConditioningReport {
        cond_mode: steer.mode.name(),
        cond_format: steer.format.name(),
        text: match (steer.mode, c) {
            (CondMode::Text, Some(c)) => c.as_text(steer.format),
            _ => String::new(),
        },
        k: steer.k(),
        vector: c.map_or_else(Vec::new, |c| c.vector.clone()),
        ablated: c.is_some_and(|c| c.ablated),
        world_tokens: c.map_or(0, |c| c.world_tokens),
    };
    Some(json!({ "conditioning": report }))
}

/// The non-streaming reply.
fn whole_reply(shape: &Shape, text: &str, outcome: &Outcome) -> Value {
    let g = &outcome.generation;
    let mut reply = if shape.chat {
        let (content, calls) = if shape.tools {
            split_calls(text)
        } else {
            (text.to_string(), Vec::new())
        };
        let mut message = json!({
            "role": "assistant",
            "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { content.into() },
        });
        if !calls.is_empty() {
            message["tool_calls"] = json!(calls);
        }
        json!({
            "id": shape.id,
            "object": "chat.completion",
            "created": shape.created,
            "model": MODEL_ID,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": finish_reason(g.finish_reason, !calls.is_empty()),
            }],
            "usage": usage(g),
        })
    } else {
        json!({
            "id": shape.id,
            "object": "text_completion",
            "created": shape.created,
            "model": MODEL_ID,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(g.finish_reason, false),
            }],
            "usage": usage(g),
        })
    };
    if let Some(tofy) = report(shape, outcome) {
        reply["tofy"] = tofy;
    }
    reply
}

/// Content and tool calls of a whole reply.
fn split_calls(text: &str) -> (String, Vec<ToolCall>) {
    let mut parser = ToolCallParser::default();
    let mut parsed = parser.push(text);
    parsed.extend(parser.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for item in parsed {
        match item {
            Parsed::Content(text) => content.push_str(&text),
            Parsed::Call(call) => calls.push(tools::with_id(call)),
        }
    }
    // The whitespace around calls is not a message of its own.
    if !calls.is_empty() && content.trim().is_empty() {
        content.clear();
    }
    (content, calls)
}

/// The SSE body: a state machine over the generation's events.
struct Sse {
    rx: mpsc::UnboundedReceiver<Event>,
    first: Option<Event>,
    shape: Shape,
    parser: ToolCallParser,
    calls: usize,
    started: bool,
    done: bool,
}

impl Sse {
    async fn next_bytes(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut out = String::new();
        if !self.started {
            self.started = true;
            if self.shape.chat {
                // OpenAI's first chunk carries the role and empty content.
                self.choice(
                    &mut out,
                    "delta",
                    json!({ "role": "assistant", "content": "" }),
                    None,
                );
                return Some(out.into());
            }
        }
        loop {
            let event = match self.first.take() {
                Some(event) => Some(event),
                None => self.rx.recv().await,
            };
            match event {
                Some(Event::Piece(piece)) => {
                    let parsed = if self.shape.tools {
                        self.parser.push(&piece)
                    } else {
                        vec![Parsed::Content(piece)]
                    };
                    self.parsed(&mut out, parsed);
                    if !out.is_empty() {
                        return Some(out.into());
                    }
                }
                Some(Event::Done(Ok(outcome))) => {
                    let rest = self.parser.finish();
                    self.parsed(&mut out, rest);
                    self.end(&mut out, &outcome);
                    return Some(out.into());
                }
                Some(Event::Done(Err(err))) => {
                    event_line(&mut out, &json!(err.body()));
                    self.close(&mut out);
                    return Some(out.into());
                }
                None => {
                    let err = ApiError::internal("the generation thread stopped");
                    event_line(&mut out, &json!(err.body()));
                    self.close(&mut out);
                    return Some(out.into());
                }
            }
        }
    }

    fn parsed(&mut self, out: &mut String, parsed: Vec<Parsed>) {
        for item in parsed {
            match item {
                Parsed::Content(text) if self.shape.chat => {
                    self.choice(out, "delta", json!({ "content": text }), None);
                }
                Parsed::Content(text) => self.choice(out, "text", json!(text), None),
                Parsed::Call(call) => {
                    let call = tools::with_id(call);
                    let index = self.calls;
                    self.calls += 1;
                    // The name first, then the arguments, as OpenAI streams them.
                    let head = json!({ "tool_calls": [{
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": { "name": call.function.name, "arguments": "" },
                    }]});
                    self.choice(out, "delta", head, None);
                    let args = json!({ "tool_calls": [{
                        "index": index,
                        "function": { "arguments": call.function.arguments },
                    }]});
                    self.choice(out, "delta", args, None);
                }
            }
        }
    }

    fn end(&mut self, out: &mut String, outcome: &Outcome) {
        let g = &outcome.generation;
        let reason = finish_reason(g.finish_reason, self.calls > 0);
        if self.shape.chat {
            self.choice(out, "delta", json!({}), Some(reason));
        } else {
            self.choice(out, "text", json!(""), Some(reason));
        }
        if let Some(tofy) = report(&self.shape, outcome) {
            let mut chunk = self.envelope();
            chunk["choices"] = json!([]);
            chunk["tofy"] = tofy;
            event_line(out, &chunk);
        }
        // OpenAI's usage chunk is the last before [DONE].
        if self.shape.include_usage {
            let mut chunk = self.envelope();
            chunk["choices"] = json!([]);
            chunk["usage"] = json!(usage(g));
            event_line(out, &chunk);
        }
        self.close(out);
    }

    /// The stream's last line; nothing follows it.
    fn close(&mut self, out: &mut String) {
        out.push_str("data: [DONE]\n\n");
        self.done = true;
    }

    fn envelope(&self) -> Value {
        let object = if self.shape.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = json!({
            "id": self.shape.id,
            "object": object,
            "created": self.shape.created,
            "model": MODEL_ID,
        });
        if self.shape.include_usage {
            // With include_usage, OpenAI sends usage: null on every other chunk.
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// One chunk with one choice: `key` is `delta` (chat) or `text`.
    fn choice(&self, out: &mut String, key: &str, value: Value, finish: Option<&str>) {
        let mut choice = json!({ "index": 0 });
        choice[key] = value;
        choice["logprobs"] = Value::Null;
        choice["finish_reason"] = json!(finish);
        let mut chunk = self.envelope();
        chunk["choices"] = json!([choice]);
        event_line(out, &chunk);
    }
}

fn event_line(out: &mut String, value: &Value) {
    out.push_str("data: ");
    out.push_str(&value.to_string());
    out.push_str("\n\n");
}
