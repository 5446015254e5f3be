//! The OpenAI wire format: what clients send (parsed leniently: unknown
//! fields are ignored, as OpenAI clients send many) and what goes back.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conditioning::{CondFormat, CondMode};

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RequestMessage>,
    #[serde(flatten)]
    pub options: GenerationOptions,
    #[serde(default)]
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
}

impl ChatRequest {
    /// The tool definitions' system-prompt section, when the request offers
    /// tools (some, and `tool_choice` not `"none"`).
    pub fn offered_tools(&self) -> Option<String> {
        let offered = !self.tools.is_empty()
            && self.tool_choice.as_ref().and_then(Value::as_str) != Some("none");
        offered.then(|| super::tools::tools_prompt(&self.tools))
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Optional when `prompt_embeds` is given: the text continues after
    /// the rows.
    pub prompt: Option<PromptField>,
    /// Embedding rows before the prompt (`server::embeds` encodings).
    pub prompt_embeds: Option<Value>,
    #[serde(flatten)]
    pub options: GenerationOptions,
}

/// What both endpoints share: sampling, limits, streaming, extensions.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationOptions {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub n: Option<i64>,
    /// llama-server's extension: keep generating past end-of-turn tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    pub tofy: Option<TofyOptions>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The `"tofy"` extension object.
#[derive(Debug, Default, Deserialize)]
pub struct TofyOptions {
    #[serde(default)]
    pub ablate_conditioning: bool,
    pub cond_format: Option<ByName<CondFormat>>,
    pub cond_mode: Option<ByName<CondMode>>,
    /// Rows that replace the world model's (prefix mode).
    pub prefix_embeddings: Option<Value>,
    /// A world vector (bridge_dim floats) that skips the world model and
    /// goes through the projector (prefix mode).
    pub conditioning: Option<Vec<f32>>,
    #[serde(default)]
    pub return_conditioning: bool,
}

/// A value given by name (a conditioning mode or format), parsed with its
/// `FromStr`, whose error names the choices.
#[derive(Debug, Clone, Copy)]
pub struct ByName<T>(pub T);

impl<'de, T> Deserialize<'de> for ByName<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map(Self).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        // Empty strings are ignored by the stop scanner.
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Vec<RequestToolCall>,
}

/// Message content: a string, or a list of typed parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RequestToolCall {
    pub function: RequestFunction,
}

#[derive(Debug, Deserialize)]
pub struct RequestFunction {
    pub name: String,
    /// A JSON string, as OpenAI sends it (some clients send an object).
    #[serde(default)]
    pub arguments: Value,
}

/// `usage`, with OpenAI's cached-token detail.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A tool call in a reply.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// `chat.completion`: a whole chat reply.
#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'static str,
    pub choices: [ChatChoice; 1],
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tofy: Option<TofyReport>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ReplyMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ReplyMessage {
    pub role: &'static str,
    /// `null` when the reply is tool calls alone.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// `text_completion`: a whole raw completion.
#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'static str,
    pub choices: [TextChoice; 1],
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

/// One SSE chunk (`chat.completion.chunk`, or `text_completion` for raw
/// completions).
#[derive(Debug, Serialize)]
pub struct Chunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'static str,
    pub choices: Vec<ChunkChoice>,
    /// Absent without `include_usage`; with it, `null` on every chunk but
    /// the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tofy: Option<TofyReport>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    #[serde(flatten)]
    pub body: ChunkBody,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// A chat chunk's `delta`, or a raw completion chunk's `text`.
#[derive(Debug, Serialize)]
pub enum ChunkBody {
    #[serde(rename = "delta")]
    Delta(Delta),
    #[serde(rename = "text")]
    Text(String),
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<DeltaToolCall>,
}

/// A streamed tool call: its name first (with id and type), then its
/// arguments, as OpenAI streams them.
#[derive(Debug, Serialize)]
pub struct DeltaToolCall {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: DeltaFunction,
}

#[derive(Debug, Serialize)]
pub struct DeltaFunction {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// The `"tofy"` object of a reply.
#[derive(Debug, Serialize)]
pub struct TofyReport {
    pub conditioning: ConditioningReport,
}

/// The `"tofy"` object in replies when `return_conditioning` is set.
#[derive(Debug, Clone, Serialize)]
pub struct ConditioningReport {
    pub cond_mode: &'static str,
    pub cond_format: &'static str,
    /// The numbers of text mode (empty in other modes).
    pub text: String,
    /// Embedding rows in the prompt (prefix mode's K).
    pub k: usize,
    pub vector: Vec<f32>,
    pub ablated: bool,
    pub world_tokens: usize,
}

/// The body of every error reply.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}
