//! Tool calling without a Jinja engine.
//!
//! llama.cpp's C chat-template API (the one `llama-cpp-2` exposes) knows
//! roles and content but not tools, so tools are written into the prompt in
//! the Hermes/Qwen convention, which many small instruct models (SmolLM2
//! among them) were tuned on: the definitions inside `<tools></tools>` in the
//! system message, calls as `<tool_call>{"name":…,"arguments":…}</tool_call>`,
//! results as `<tool_response>…</tool_response>` in a user turn. Replies are
//! scanned for that syntax; anything that does not parse stays plain content.

use serde_json::Value;

use super::api::{FunctionCall, ToolCall};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The system-prompt section that offers `tools` (OpenAI tool objects).
pub fn tools_prompt(tools: &[Value]) -> String {
    let mut out = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        out.push('\n');
        out.push_str(&tool.to_string());
    }
    out.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    out
}

/// An assistant turn's earlier calls, written back the way the model
/// would have written them.
pub fn render_call(name: &str, arguments: &Value) -> String {
    // OpenAI sends arguments as a JSON string; put the object itself in.
    let arguments = match arguments {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        Value::Null => Value::Object(Default::default()),
        other => other.clone(),
    };
    // Name first, as the convention writes it (serde_json sorts keys).
    let name = Value::String(name.to_string());
    format!("{OPEN}\n{{\"name\": {name}, \"arguments\": {arguments}}}\n{CLOSE}")
}

/// A tool's result as the user turn the model expects.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// What the parser releases.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Content(String),
    Call(FunctionCall),
}

/// Splits a streamed reply into content and tool calls. Text that might be
/// the start of `<tool_call>` is held back until it is known not to be.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    buffer: String,
    in_call: bool,
}

impl ToolCallParser {
    pub fn push(&mut self, text: &str) -> Vec<Parsed> {
        self.buffer.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buffer.find(CLOSE) else {
                    break;
                };
                let body: String = self.buffer.drain(..end + CLOSE.len()).collect();
                let body = &body[..end];
                match parse_calls(body) {
                    Some(calls) => out.extend(calls.into_iter().map(Parsed::Call)),
                    None => out.push(Parsed::Content(format!("{OPEN}{body}{CLOSE}"))),
                }
                self.in_call = false;
            } else if let Some(start) = self.buffer.find(OPEN) {
                let before: String = self.buffer.drain(..start + OPEN.len()).collect();
                push_content(&mut out, &before[..start]);
                self.in_call = true;
            } else {
                let keep = partial_suffix(&self.buffer, OPEN);
                let release: String = self.buffer.drain(..self.buffer.len() - keep).collect();
                push_content(&mut out, &release);
                break;
            }
        }
        out
    }

    /// The end of the reply: an unterminated call is content after all.
    pub fn finish(&mut self) -> Vec<Parsed> {
        let rest = std::mem::take(&mut self.buffer);
        let text = if std::mem::take(&mut self.in_call) {
            format!("{OPEN}{rest}")
        } else {
            rest
        };
        let mut out = Vec::new();
        push_content(&mut out, &text);
        out
    }
}

fn push_content(out: &mut Vec<Parsed>, text: &str) {
    if !text.is_empty() {
        out.push(Parsed::Content(text.to_string()));
    }
}

/// The length of the longest suffix of `text` that begins `pattern`.
fn partial_suffix(text: &str, pattern: &str) -> usize {
    (1..pattern.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && pattern.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// `{"name":…,"arguments":…}`, or a list of them (SmolLM2 writes lists).
fn parse_calls(body: &str) -> Option<Vec<FunctionCall>> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let items = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    let calls = items
        .into_iter()
        .map(|item| {
            let name = item.get("name")?.as_str()?.to_string();
            let arguments = match item.get("arguments").or_else(|| item.get("parameters")) {
                None | Some(Value::Null) => "{}".to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            Some(FunctionCall { name, arguments })
        })
        .collect::<Option<Vec<_>>>()?;
    (!calls.is_empty()).then_some(calls)
}

/// A parsed call with its OpenAI id.
pub fn with_id(function: FunctionCall) -> ToolCall {
    ToolCall {
        id: format!("call_{}", uuid::Uuid::new_v4().simple()),
        kind: "function",
        function,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> Vec<Parsed> {
        let mut parser = ToolCallParser::default();
        let mut out: Vec<Parsed> = pieces.iter().flat_map(|p| parser.push(p)).collect();
        out.extend(parser.finish());
        // Merge neighbouring content for easy comparison.
        let mut merged: Vec<Parsed> = Vec::new();
        for item in out {
            match (merged.last_mut(), item) {
                (Some(Parsed::Content(a)), Parsed::Content(b)) => a.push_str(&b),
                (_, item) => merged.push(item),
            }
        }
        merged
    }

    fn call(name: &str, arguments: &str) -> Parsed {
        Parsed::Call(FunctionCall {
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    #[test]
    fn plain_text_passes_through() {
        assert_eq!(
            run(&["Hello ", "world <", "b>"]),
            [Parsed::Content("Hello world <b>".into())]
        );
    }

    #[test]
    fn a_call_split_across_pieces_is_found() {
        let out = run(&[
            "Let me check.<tool",
            "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool",
            "_call>",
        ]);
        assert_eq!(
            out,
            [
                Parsed::Content("Let me check.".into()),
                call("get_weather", r#"{"city":"Paris"}"#)
            ]
        );
    }

    #[test]
    fn lists_and_string_arguments_parse() {
        let out =
            run(&[r#"<tool_call>[{"name":"a","arguments":"{\"x\":1}"},{"name":"b"}]</tool_call>"#]);
        assert_eq!(out, [call("a", r#"{"x":1}"#), call("b", "{}")]);
    }

    #[test]
    fn broken_or_unterminated_calls_stay_content() {
        assert_eq!(
            run(&["<tool_call>not json</tool_call>"]),
            [Parsed::Content("<tool_call>not json</tool_call>".into())]
        );
        assert_eq!(
            run(&["<tool_call>{\"name\":"]),
            [Parsed::Content("<tool_call>{\"name\":".into())]
        );
    }

    #[test]
    fn earlier_calls_render_as_the_model_writes_them() {
        let text = render_call("f", &Value::String(r#"{"a":1}"#.into()));
        assert_eq!(
            text,
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\":1}}\n</tool_call>"
        );
        let mut parser = ToolCallParser::default();
        assert_eq!(parser.push(&text), [call("f", r#"{"a":1}"#)]);
    }
}
