//! `POST /v1/chat/completions` and `POST /v1/completions`: validate the
//! request, run it on a blocking thread, and answer with one JSON object or
//! an SSE stream in OpenAI's chunk format.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use tokio::sync::mpsc;

use super::api::{
    ChatChoice, ChatCompletion, ChatRequest, Chunk, ChunkBody, ChunkChoice, CompletionRequest,
    ConditioningReport, Content, Delta, DeltaFunction, DeltaToolCall, GenerationOptions,
    PromptField, ReplyMessage, RequestMessage, TextChoice, TextCompletion, TofyOptions, TofyReport,
    ToolCall, Usage,
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
/// `stop` strings per request (OpenAI's limit) and bytes per string: the
/// decoder scans its output for them after every token.
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;
/// Messages per conversation.
pub const MAX_MESSAGES: usize = 4096;
/// Tool definitions per request (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

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
    /// The decoder took the request: its prompt fits, it is queued.
    Accepted,
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
    check_counts(&body)?;
    let tofy = body.options.tofy.take().unwrap_or_default();
    let report = tofy.return_conditioning;
    let turn = turn_options(&state, tofy)?;
    let offer = body.offered_tools();
    let conversation = conversation(body.messages)?;
    let world_prompt = conversation
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .unwrap_or_default();
    let bytes = conversation.iter().map(|m| m.content.len()).sum::<usize>()
        + offer.as_ref().map_or(0, String::len);
    check_size(&state, bytes, "messages")?;
    let offered = offer.is_some();
    let input = Input::Chat {
        conversation,
        world_prompt,
        tools: offer,
    };
    respond(
        state,
        &req,
        body.options,
        input,
        turn,
        report,
        true,
        offered,
    )
    .await
}

/// At most [`MAX_MESSAGES`] messages and [`MAX_TOOLS`] tools.
fn check_counts(body: &ChatRequest) -> Result<(), ApiError> {
    if body.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "{} messages; at most {MAX_MESSAGES} are accepted: drop or summarise earlier turns",
                body.messages.len()
            ),
        ));
    }
    if body.tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid_param(
            "tools",
            format!(
                "{} tools; at most {MAX_TOOLS} are accepted",
                body.tools.len()
            ),
        ));
    }
    Ok(())
}

/// What the chat handler makes of a body before the world model and the
/// decoder run: every check, then the conversation with its tools in the
/// plain layout (a GGUF's template needs the model). For the fuzz targets.
pub(crate) fn chat_prompt(body: &[u8]) -> Result<String, ApiError> {
    let mut body: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    check_counts(&body)?;
    let tofy = body.options.tofy.take().unwrap_or_default();
    if let Some(value) = &tofy.prefix_embeddings {
        embeds::parse(value, &FUZZ_LIMITS, "tofy.prefix_embeddings")?;
    }
    generate_request(
        &Sampling::default(),
        256,
        &mut body.options,
        Prompt::Raw(Vec::new()),
    )?;
    let offer = body.offered_tools();
    let conversation = conversation(body.messages)?;
    let messages = match &offer {
        Some(offer) => offer_tools(&conversation, offer),
        None => conversation,
    };
    Ok(crate::decoder::prompt::plain_layout(&messages))
}

/// SmolLM2's input width and the default context, for the fuzz targets.
pub(crate) const FUZZ_LIMITS: Limits = Limits {
    width: 576,
    context: 4096,
};

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

/// Refuses, unread, a prompt text longer than any that fits the context.
fn check_size(state: &State, bytes: usize, param: &'static str) -> Result<(), ApiError> {
    let decoder = state.decoder()?;
    match (decoder.prompt_byte_limit(), decoder.context_size()) {
        (Some(limit), Some(context)) if bytes > limit => Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid_param(
                param,
                format!(
                    "context length exceeded: the {param} hold {bytes} bytes of text, more than any prompt the context of {context} tokens can hold ({limit} bytes); shorten them or raise JEPA_DECODER_CTX"
                ),
            )
        }),
        _ => Ok(()),
    }
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
    if text.contains('\0') {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt holds a NUL byte (U+0000), which the decoder cannot read; remove it",
        ));
    }
    check_size(&state, text.len(), "prompt")?;
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
        // llama.cpp's template API takes C strings.
        if text.contains('\0') {
            return Err(ApiError::invalid_param(
                "messages",
                format!(
                    "messages[{i}].content holds a NUL byte (U+0000), which the chat template cannot read; remove it"
                ),
            ));
        }
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
    defaults: &Sampling,
    default_max_tokens: usize,
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
        None => default_max_tokens,
        Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(n) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("max_tokens is {n}; it must be at least 1"),
            ));
        }
    };
    let mut sampling: Sampling = defaults.clone();
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
    let stop = options
        .stop
        .take()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "{} stop strings; at most {MAX_STOPS} are accepted",
                stop.len()
            ),
        ));
    }
    if let Some((i, s)) = stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "stop[{i}] is {} bytes; each stop string may be at most {MAX_STOP_BYTES}",
                s.len()
            ),
        ));
    }
    Ok(GenerateRequest {
        prompt,
        max_new_tokens: max_tokens,
        sampling,
        stop,
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
    let request = generate_request(
        &state.sampling,
        state.max_tokens,
        &mut options,
        Prompt::Raw(Vec::new()),
    )?;
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
    let span = tracing::info_span!(
        "generation",
        id = %shape.id,
        request_id = %super::request_id(req),
        stream = options.stream,
    );
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
    actix_web::rt::task::spawn_blocking(move || {
        span.in_scope(|| execute(&worker_state, job, &tx, admission));
    });
    // Nothing is sent before the decoder has accepted the request (its
    // prompt laid out and within the context), so that what is wrong with
    // it is still an HTTP error.
    let gone = || ApiError::internal("the generation thread", "it ended without a result");
    match rx.recv().await.ok_or_else(gone)? {
        Event::Accepted => {}
        Event::Done(Err(mut err)) => {
            // A raw prompt's errors are about `prompt`, not `messages`.
            if !chat && err.param == Some("messages") {
                err.param = Some("prompt");
            }
            return Err(err);
        }
        Event::Piece(_) | Event::Done(Ok(_)) => {
            return Err(ApiError::internal(
                "the generation thread",
                "output before the request was accepted",
            ));
        }
    }
    if options.stream {
        let stream = Sse {
            rx,
            shape,
            keep_alive: state.keep_alive,
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
        let outcome = loop {
            match rx.recv().await.ok_or_else(gone)? {
                Event::Piece(piece) => text.push_str(&piece),
                Event::Done(result) => break result?,
                Event::Accepted => {}
            }
        };
        let reply = if shape.chat {
            serde_json::to_value(chat_reply(&shape, &text, &outcome))
        } else {
            serde_json::to_value(text_reply(&shape, text, &outcome))
        };
        Ok(HttpResponse::Ok()
            .json(reply.map_err(|e| ApiError::internal("the reply", e.to_string()))?))
    }
}

/// The blocking part, guarded: a panic fails this request alone. After it,
/// a decoder whose worker died takes the server down (docs/server.md).
fn execute(state: &Arc<State>, job: Job, tx: &mpsc::UnboundedSender<Event>, admission: Admission) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(state, job, tx)))
        .unwrap_or_else(|payload| {
            Err(ApiError::internal(
                "the request",
                format!(
                    "panicked: {}",
                    crate::fault::panic_message(payload.as_ref())
                ),
            ))
        });
    // Free the place first: a client that sends its next request the moment
    // this one ends must find it free.
    drop(admission);
    match &result {
        Ok(outcome) => {
            let g = &outcome.generation;
            tracing::info!(
                finish = ?g.finish_reason,
                prompt_tokens = g.prompt_tokens,
                cached_tokens = g.cached_tokens,
                completion_tokens = g.completion_tokens,
                ttft_ms = g.time_to_first_token.as_millis() as u64,
                total_ms = g.total_time.as_millis() as u64,
                "generation finished"
            );
        }
        // 503: the server is draining or stopping; the request is the
        // client's to retry, not a failure of this one.
        Err(err) if err.status == actix_web::http::StatusCode::SERVICE_UNAVAILABLE => {
            tracing::warn!(status = 503, cause = err.cause(), "generation stopped");
        }
        Err(err) if err.status.is_server_error() => {
            tracing::error!(
                status = err.status.as_u16(),
                cause = err.cause(),
                "generation failed"
            );
        }
        Err(err) => {
            tracing::info!(
                status = err.status.as_u16(),
                cause = err.cause(),
                "generation refused"
            );
        }
    }
    if let Ok(engine) = state.engine()
        && let Err(reason) = engine.decoder().health()
    {
        state.fail(reason);
    }
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
    let decoder = engine.decoder();
    let (conversation, world_prompt, tools) = match input {
        Input::Raw(segments) => {
            request.prompt = Prompt::Raw(segments);
            crate::fault::inject(crate::fault::Point::Request, || {
                request.prompt.last_user_text()
            });
            let accepted = decoder.submit(&request)?;
            let _ = tx.send(Event::Accepted);
            let generation = accepted.stream(&mut sink)?;
            return Ok(state.finished(generation, None));
        }
        Input::Chat {
            conversation,
            world_prompt,
            tools,
        } => (conversation, world_prompt, tools),
    };
    crate::fault::inject(crate::fault::Point::Request, || world_prompt.as_str());
    let steer = engine.steer(&world_prompt, &turn)?;
    request.control = steer.control.clone();
    let messages = match &tools {
        Some(offer) => offer_tools(&conversation, offer),
        None => conversation,
    };
    request.prompt = engine.apply(&steer, messages);
    let accepted = match decoder.submit(&request) {
        // Tool definitions can be long (OpenCode's are ~5k tokens). A
        // prompt is never cut: the client learns which part to shorten.
        Err(DecoderError::ContextExceeded {
            prompt_tokens,
            context,
        }) if tools.is_some() => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid_param(
                    "tools",
                    format!(
                        "context length exceeded: with its tool definitions the prompt is {prompt_tokens} tokens but the context holds {context} (JEPA_DECODER_CTX); offer fewer or shorter tools, shorten the conversation, or raise JEPA_DECODER_CTX"
                    ),
                )
            });
        }
        other => other?,
    };
    let _ = tx.send(Event::Accepted);
    let generation = accepted.stream(&mut sink)?;
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

fn report(shape: &Shape, outcome: &Outcome) -> Option<TofyReport> {
    let steer = outcome.steer.as_deref().filter(|_| shape.report)?;
    let c = steer.conditioning.as_ref();
    let conditioning = ConditioningReport {
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
    Some(TofyReport { conditioning })
}

/// The non-streaming chat reply.
fn chat_reply<'a>(shape: &'a Shape, text: &str, outcome: &Outcome) -> ChatCompletion<'a> {
    let g = &outcome.generation;
    let (content, calls) = if shape.tools {
        split_calls(text)
    } else {
        (text.to_string(), Vec::new())
    };
    let reason = finish_reason(g.finish_reason, !calls.is_empty());
    ChatCompletion {
        id: &shape.id,
        object: "chat.completion",
        created: shape.created,
        model: MODEL_ID,
        choices: [ChatChoice {
            index: 0,
            message: ReplyMessage {
                role: "assistant",
                content: (!content.is_empty() || calls.is_empty()).then_some(content),
                tool_calls: calls,
            },
            logprobs: None,
            finish_reason: reason,
        }],
        usage: usage(g),
        tofy: report(shape, outcome),
    }
}

/// The non-streaming raw completion.
fn text_reply<'a>(shape: &'a Shape, text: String, outcome: &Outcome) -> TextCompletion<'a> {
    let g = &outcome.generation;
    TextCompletion {
        id: &shape.id,
        object: "text_completion",
        created: shape.created,
        model: MODEL_ID,
        choices: [TextChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: finish_reason(g.finish_reason, false),
        }],
        usage: usage(g),
    }
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

/// The SSE body: a state machine over the generation's events, with a
/// keep-alive comment whenever nothing else was sent for `keep_alive`.
struct Sse {
    rx: mpsc::UnboundedReceiver<Event>,
    shape: Shape,
    keep_alive: Duration,
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
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Delta::default()
                };
                self.choice(&mut out, ChunkBody::Delta(delta), None);
            } else {
                // Headers go out now; a raw completion has no opening chunk,
                // so its first bytes are a comment.
                out.push_str(": accepted\n\n");
            }
            return Some(out.into());
        }
        loop {
            let event = match actix_web::rt::time::timeout(self.keep_alive, self.rx.recv()).await {
                Ok(event) => event,
                // Waiting for a sequence, or reading a long prompt: a comment
                // keeps proxies and clients from timing the stream out.
                Err(_) => return Some(Bytes::from_static(b": keep-alive\n\n")),
            };
            match event {
                Some(Event::Accepted) => {}
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
                    event_line(&mut out, &err.body());
                    self.close(&mut out);
                    return Some(out.into());
                }
                None => {
                    let err =
                        ApiError::internal("the generation thread", "it ended without a result");
                    event_line(&mut out, &err.body());
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
                    let delta = Delta {
                        content: Some(text),
                        ..Delta::default()
                    };
                    self.choice(out, ChunkBody::Delta(delta), None);
                }
                Parsed::Content(text) => self.choice(out, ChunkBody::Text(text), None),
                Parsed::Call(call) => {
                    let call = tools::with_id(call);
                    let index = self.calls;
                    self.calls += 1;
                    // The name first, then the arguments, as OpenAI streams them.
                    let head = DeltaToolCall {
                        index,
                        id: Some(call.id),
                        kind: Some("function"),
                        function: DeltaFunction {
                            name: Some(call.function.name),
                            arguments: String::new(),
                        },
                    };
                    let args = DeltaToolCall {
                        index,
                        id: None,
                        kind: None,
                        function: DeltaFunction {
                            name: None,
                            arguments: call.function.arguments,
                        },
                    };
                    for call in [head, args] {
                        let delta = Delta {
                            tool_calls: vec![call],
                            ..Delta::default()
                        };
                        self.choice(out, ChunkBody::Delta(delta), None);
                    }
                }
            }
        }
    }

    fn end(&mut self, out: &mut String, outcome: &Outcome) {
        let g = &outcome.generation;
        let reason = finish_reason(g.finish_reason, self.calls > 0);
        let body = if self.shape.chat {
            ChunkBody::Delta(Delta::default())
        } else {
            ChunkBody::Text(String::new())
        };
        self.choice(out, body, Some(reason));
        if let Some(tofy) = report(&self.shape, outcome) {
            let mut chunk = self.chunk(Vec::new());
            chunk.tofy = Some(tofy);
            event_line(out, &chunk);
        }
        // OpenAI's usage chunk is the last before [DONE].
        if self.shape.include_usage {
            let mut chunk = self.chunk(Vec::new());
            chunk.usage = Some(Some(usage(g)));
            event_line(out, &chunk);
        }
        self.close(out);
    }

    /// The stream's last line; nothing follows it.
    fn close(&mut self, out: &mut String) {
        out.push_str("data: [DONE]\n\n");
        self.done = true;
    }

    fn chunk(&self, choices: Vec<ChunkChoice>) -> Chunk<'_> {
        Chunk {
            id: &self.shape.id,
            object: if self.shape.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            },
            created: self.shape.created,
            model: MODEL_ID,
            choices,
            // With include_usage, OpenAI sends usage: null on every other chunk.
            usage: self.shape.include_usage.then_some(None),
            tofy: None,
        }
    }

    /// One chunk with one choice.
    fn choice(&self, out: &mut String, body: ChunkBody, finish: Option<&'static str>) {
        let choice = ChunkChoice {
            index: 0,
            body,
            logprobs: None,
            finish_reason: finish,
        };
        event_line(out, &self.chunk(vec![choice]));
    }
}

fn event_line(out: &mut String, value: &impl Serialize) {
    out.push_str("data: ");
    // Plain structs of strings and numbers: serialising cannot fail.
    out.push_str(&serde_json::to_string(value).unwrap_or_default());
    out.push_str("\n\n");
}
