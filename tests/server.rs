//! `tofy serve` as a real process on a loopback port, driven over HTTP: the
//! OpenAI formats (JSON and SSE), continuous batching, the prompt cache,
//! disconnects, tool calls, every error status, and the official clients
//! (openai for Python, the AI SDK, OpenCode) through tests/clients.

mod common;

use common::server::{Server, chat, events, stream_text, with};

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

#[test]
fn chat_completions_and_models_speak_openai() {
    let server = Server::start(&[], &[]);
    let (status, reply) = server.post("/v1/chat/completions", &chat("Say hello.", 12));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "tofy");
    let message = &reply["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let text = message["content"].as_str().unwrap();
    assert!(!text.trim().is_empty());
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    let usage = &reply["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + 12)
    );

    // The same request streamed gives the same greedy text, framed as OpenAI does.
    let body = with(chat("Say hello.", 12), "stream", json!(true));
    let body = with(body, "stream_options", json!({"include_usage": true}));
    let events = server.stream("/chat/completions", &body);
    let (streamed, last) = stream_text(&events);
    assert_eq!(streamed, text);
    assert_eq!(last["choices"], json!([]), "usage comes in a last chunk");
    assert_eq!(last["usage"]["completion_tokens"], 12);

    // Text completions, both ways.
    let prompt = json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0});
    let (status, reply) = server.post("/v1/completions", &prompt);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "text_completion");
    let text = reply["choices"][0]["text"].as_str().unwrap().to_string();
    let events = server.stream("/v1/completions", &with(prompt, "stream", json!(true)));
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, text);

    for path in ["/v1/models", "/models"] {
        let (status, body) = server.get(path);
        assert_eq!(status, 200);
        let models: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "tofy");
        assert_eq!(models["data"][0]["object"], "model");
    }
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "{health}");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok");
    assert!(health["replica"].as_str().is_some_and(|r| !r.is_empty()));

    // No user text for the world model: answered unconditioned, not an error.
    let body =
        json!({"messages": [{"role": "system", "content": "Greet the user."}], "max_tokens": 4});
    let (status, reply) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");

    // The conditioning the world model gave, on request; ablation zeroes it.
    let body = with(
        chat("Say hello.", 2),
        "tofy",
        json!({"return_conditioning": true, "cond_mode": "text", "cond_format": "stats"}),
    );
    let (_, reply) = server.post("/v1/chat/completions", &body);
    let report = &reply["tofy"]["conditioning"];
    assert_eq!(report["cond_format"], "stats");
    assert!(report["text"].as_str().unwrap().starts_with("mean="));
    assert!(
        report["vector"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_f64() != Some(0.0))
    );
    let body = with(
        chat("Say hello.", 2),
        "tofy",
        json!({"return_conditioning": true, "ablate_conditioning": true}),
    );
    let (_, reply) = server.post("/v1/chat/completions", &body);
    let report = &reply["tofy"]["conditioning"];
    assert_eq!(report["ablated"], true);
    assert!(
        report["vector"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64() == Some(0.0))
    );
}

#[test]
fn eight_concurrent_streams_match_their_single_outputs() {
    let server = Server::start(&["--parallel", "8"], &[]);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Write a short story about animal number {i}."))
        .collect();
    let body = |p: &str| with(chat(p, 24), "stream", json!(true));
    let single: Vec<String> = prompts
        .iter()
        .map(|p| stream_text(&server.stream("/v1/chat/completions", &body(p))).0)
        .collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (server, body) = (&server, body(p));
                scope.spawn(move || stream_text(&server.stream("/v1/chat/completions", &body)).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        together, single,
        "greedy replies must not depend on batching"
    );
    assert!(single.iter().all(|s| !s.is_empty()));
    assert_eq!(server.metric("tofy_sequences_active"), 0.0);
    assert_eq!(server.metric("tofy_completion_tokens_total"), 16.0 * 24.0);
}

#[test]
fn a_disconnect_frees_its_sequence() {
    let server = Server::start(&["--parallel", "1", "--queue", "0"], &[]);
    let long = with(chat("Count to one thousand.", 3000), "stream", json!(true));
    let long = with(long, "ignore_eos", json!(true));
    let mut reader = server.open_stream("/v1/chat/completions", &long);
    let mut line = String::new();
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    assert_eq!(server.metric("tofy_sequences_active"), 1.0);
    // The one place is taken and nothing may queue: 429 in OpenAI form (a
    // 503 would tell a balancer this healthy replica is down).
    let (status, body) = server.post("/v1/chat/completions", &chat("Hi", 2));
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], "server_busy");

    drop(reader);
    server.wait_until(
        || {
            server.metric("tofy_sequences_active") == 0.0
                && server.metric("tofy_sequences_queued") == 0.0
        },
        "the disconnected stream to free its sequence",
    );
    let (status, body) = server.post("/v1/chat/completions", &chat("Hi", 2));
    assert_eq!(status, 200, "{body}");
    assert!(
        server.metric("tofy_completion_tokens_total") < 3000.0,
        "the long stream stopped early"
    );
}

fn sigterm(server: &Server) {
    server.signal(libc::SIGTERM);
}

#[test]
fn a_replica_names_itself_and_drains_on_sigterm() {
    let mut server = Server::start(
        &["--replica-id", "replica-a", "--drain-timeout", "600"],
        &[],
    );
    let (status, replica, body) = server.get_header("/health", "x-tofy-replica");
    assert_eq!(
        (status, replica.as_deref()),
        (200, Some("replica-a")),
        "{body}"
    );
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health, json!({"status": "ok", "replica": "replica-a"}));
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains(r#"tofy_sequences_active{replica="replica-a"} 0"#),
        "{metrics}"
    );

    // Two streams in flight: a short one that must finish during the
    // drain, and an endless one that keeps the server draining until its
    // client leaves.
    let short = with(chat("Count to one hundred.", 150), "stream", json!(true));
    let short = with(short, "ignore_eos", json!(true));
    let endless = with(short.clone(), "max_tokens", json!(3000));
    let mut short = server.open_stream("/v1/chat/completions", &short);
    let mut endless = server.open_stream("/v1/chat/completions", &endless);
    let mut line = String::new();
    for reader in [&mut short as &mut dyn BufRead, &mut endless] {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("data: "), "{line}");
    }

    sigterm(&server);
    let draining = server.wait_for_log(&["draining", "SIGTERM"]);
    assert!(draining.contains("in_flight=2"), "{draining}");
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        health,
        json!({"status": "draining", "replica": "replica-a"})
    );
    let (status, body) = server.post("/v1/chat/completions", &chat("Hi", 2));
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("draining"),
        "{body}"
    );

    let rest = events(short);
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    assert!(rest.len() > 2, "the short stream went on: {rest:?}");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server must wait for the endless stream"
    );
    // Its client leaves: the generation is cancelled, the drain ends.
    drop(endless);
    let status = server.exit_status();
    assert!(status.success(), "{status}");
    server.wait_for_log(&["generation finished", "finish=Cancelled"]);
    server.wait_for_log(&["drained; stopping"]);
}

/// A 3000-token stream that never ends by itself, its first line read.
fn endless_stream(server: &Server) -> BufReader<impl Read + use<>> {
    let endless = with(chat("Count to one thousand.", 3000), "stream", json!(true));
    let mut endless = server.open_stream(
        "/v1/chat/completions",
        &with(endless, "ignore_eos", json!(true)),
    );
    let mut line = String::new();
    endless.read_line(&mut line).unwrap();
    endless
}

/// The worker stopped within its bound: no `_exit` was needed.
fn assert_stopped_within_bounds(server: &Server) {
    assert!(
        !server.log().iter().any(|l| l.contains("without cleanup")),
        "{:?}",
        server.log()
    );
}

#[test]
fn a_drain_that_outlasts_its_timeout_still_exits_0() {
    let mut server = Server::start(&["--drain-timeout", "1"], &[]);
    let endless = endless_stream(&server);
    sigterm(&server);
    let status = server.exit_status();
    assert!(status.success(), "{status}");
    server.wait_for_log(&["drain timeout passed", "left=1"]);
    // Cut: the body ends (or errors) with no [DONE].
    let lines: Vec<String> = endless.lines().map_while(Result::ok).collect();
    assert!(!lines.iter().any(|l| l == "data: [DONE]"), "{lines:?}");
    assert_stopped_within_bounds(&server);
}

#[test]
fn a_second_signal_mid_drain_stops_at_once_and_cleanly() {
    let mut server = Server::start(&["--drain-timeout", "600"], &[]);
    let endless = endless_stream(&server);
    sigterm(&server);
    server.wait_for_log(&["draining", "SIGTERM"]);
    // Still draining: the endless stream keeps it up for ten minutes.
    assert!(server.child.try_wait().unwrap().is_none());
    server.signal(libc::SIGINT);
    let status = server.exit_status();
    assert!(status.success(), "{status}");
    server.wait_for_log(&["second signal", "SIGINT"]);
    assert_stopped_within_bounds(&server);
    let lines: Vec<String> = endless.lines().map_while(Result::ok).collect();
    assert!(!lines.iter().any(|l| l == "data: [DONE]"), "{lines:?}");
}

/// Sends a request on a raw connection and returns the connection, unread.
fn send_raw(server: &Server, path: &str, body: &Value) -> std::net::TcpStream {
    use std::io::Write;
    let address = server.base.strip_prefix("http://").unwrap();
    let mut socket = std::net::TcpStream::connect(address).expect("connect");
    let body = body.to_string();
    write!(
        socket,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    socket
}

#[test]
fn a_client_that_leaves_before_its_reply_frees_its_place() {
    // Non-streaming requests: nothing is written to them before the end,
    // so only their sockets can say they have gone.
    let server = Server::start(&["--parallel", "1", "--queue", "1"], &[]);
    let long = with(
        chat("Count to one thousand.", 3000),
        "ignore_eos",
        json!(true),
    );
    let running = send_raw(&server, "/v1/chat/completions", &long);
    server.wait_until(
        || server.metric("tofy_sequences_active") == 1.0,
        "the first request to start",
    );
    let queued = send_raw(&server, "/v1/chat/completions", &long);
    server.wait_until(
        || server.metric("tofy_sequences_queued") == 1.0,
        "the second request to queue",
    );

    drop(queued);
    server.wait_until(
        || server.metric("tofy_sequences_queued") == 0.0,
        "the queued request to be dropped",
    );
    // Dropped while the first still runs (without the socket watch it
    // would leave the queue only when the first ends, 3000 tokens later).
    assert_eq!(server.metric("tofy_sequences_active"), 1.0);
    assert_eq!(server.metric("tofy_completion_tokens_total"), 0.0);

    drop(running);
    server.wait_until(
        || server.metric("tofy_sequences_active") == 0.0,
        "the running request to free its sequence",
    );
    let (status, body) = server.post("/v1/chat/completions", &chat("Hi", 2));
    assert_eq!(status, 200, "{body}");
    assert!(
        server.metric("tofy_completion_tokens_total") < 3000.0,
        "the long request stopped early"
    );
}

#[test]
fn a_repeated_conversation_reuses_the_prompt_cache() {
    let server = Server::start(&["--parallel", "2"], &[]);
    let conversation = json!({
        "messages": [
            {"role": "system", "content": "You are a terse assistant who answers in one line."},
            {"role": "user", "content": "What is the tallest mountain?"},
            {"role": "assistant", "content": "Mount Everest."},
            {"role": "user", "content": "How tall is it?"},
        ],
        "max_tokens": 8,
        "temperature": 0,
    });
    let (_, first) = server.post("/v1/chat/completions", &conversation);
    let (_, second) = server.post("/v1/chat/completions", &conversation);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(second["usage"]["prompt_tokens"].as_u64(), Some(prompt));
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt - 1),
        "all but the last prompt token come from the cache"
    );
    assert_eq!(
        first["choices"][0]["message"],
        second["choices"][0]["message"]
    );

    // The next turn of the same conversation keeps the shared head (the
    // system prompt and the earlier turns come before the conditioning).
    let mut next = conversation.clone();
    let messages = next["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": "8,849 metres."}));
    messages.push(json!({"role": "user", "content": "And the second tallest?"}));
    let (_, third) = server.post("/v1/chat/completions", &next);
    let cached = third["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Everything before the first request's conditioning message: the
    // system prompt and the first exchange (38 tokens with SmolLM2).
    assert!(
        cached >= 30,
        "the system prompt and first turns were reused: {third}"
    );
    assert!(server.metric("tofy_cached_prompt_tokens_total") >= (prompt - 1 + cached) as f64);
}

#[test]
fn every_error_is_an_openai_error_with_its_status() {
    let server = Server::start(&["--ctx", "256", "--api-key", "sesame"], &[]);
    let key = Some("sesame");
    let ok = chat("Hi", 2).to_string();
    let check = |(status, body): (u16, String), want: u16, needle: &str| {
        let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        let error = &value["error"];
        assert_eq!(status, want, "{body}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
        assert!(
            error["type"].is_string()
                && error.get("param").is_some()
                && error.get("code").is_some()
        );
        value
    };
    check(
        server.post_raw("/v1/chat/completions", &ok, None),
        401,
        "API key",
    );
    check(
        server.post_raw("/v1/chat/completions", &ok, Some("wrong")),
        401,
        "API key",
    );
    check(
        server.post_raw("/v1/chat/completions", "{not json", key),
        400,
        "invalid JSON",
    );
    check(
        server.post_raw("/v1/chat/completions", r#"{"messages": "hi"}"#, key),
        400,
        "invalid type",
    );
    check(
        server.post_raw("/v1/chat/completions", r#"{"messages": []}"#, key),
        400,
        "messages is empty",
    );
    let two = with(chat("Hi", 2), "n", json!(2)).to_string();
    check(
        server.post_raw("/v1/chat/completions", &two, key),
        400,
        "n must be 1",
    );
    let hot = with(chat("Hi", 2), "temperature", json!(3.5)).to_string();
    check(
        server.post_raw("/v1/chat/completions", &hot, key),
        400,
        "temperature",
    );
    let long = chat(&"many words here ".repeat(200), 2).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &long, key),
        400,
        "context length exceeded",
    );
    assert_eq!(value["error"]["code"], "context_length_exceeded");
    let streamed = with(
        chat(&"many words here ".repeat(200), 2),
        "stream",
        json!(true),
    )
    .to_string();
    check(
        server.post_raw("/v1/chat/completions", &streamed, key),
        400,
        "context length exceeded",
    );
    let huge = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(17 << 20)
    );
    check(
        server.post_raw("/v1/chat/completions", &huge, key),
        413,
        "16 MiB",
    );
    check(server.get("/v1/nothing-here"), 404, "no route");
    check(server.get("/v1/chat/completions"), 405, "not allowed");

    // Input limits, each a 400 naming its field, before anything is queued.
    let param = |value: &Value| value["error"]["param"].as_str().unwrap_or("").to_string();
    let five = with(chat("Hi", 2), "stop", json!(["a", "b", "c", "d", "e"])).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &five, key),
        400,
        "at most 4",
    );
    assert_eq!(param(&value), "stop");
    let wide = with(chat("Hi", 2), "stop", json!(["x".repeat(257)])).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &wide, key),
        400,
        "at most 256",
    );
    assert_eq!(param(&value), "stop");
    let nul = chat("Hi\u{0}there", 2).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &nul, key),
        400,
        "NUL byte",
    );
    assert_eq!(param(&value), "messages");
    let raw_nul = json!({"prompt": "a\u{0}b", "max_tokens": 2}).to_string();
    let value = check(
        server.post_raw("/v1/completions", &raw_nul, key),
        400,
        "NUL byte",
    );
    assert_eq!(param(&value), "prompt");
    let tool =
        json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
    let many_tools = with(chat("Hi", 2), "tools", json!(vec![tool; 129])).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &many_tools, key),
        400,
        "at most 128",
    );
    assert_eq!(param(&value), "tools");
    let turn = json!({"role": "user", "content": "a"});
    let many_turns = json!({"messages": vec![turn; 4097], "max_tokens": 2}).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &many_turns, key),
        400,
        "at most 4096",
    );
    assert_eq!(param(&value), "messages");
    // Longer than any prompt the context can hold, whatever its tokens:
    // refused without being tokenized.
    let vast = chat(&"a".repeat(1 << 20), 2).to_string();
    let value = check(
        server.post_raw("/v1/chat/completions", &vast, key),
        400,
        "bytes of text",
    );
    assert_eq!(value["error"]["code"], "context_length_exceeded");

    // /metrics is behind the key too; /health never is.
    check(server.get("/metrics"), 401, "API key");
    assert_eq!(server.get("/health").0, 200);

    // The server is still up and the key works.
    let (status, body) = server.post_raw("/v1/chat/completions", &ok, key);
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.get("/health").0, 200, "/health needs no key");
}

/// A fake llama-completion for the subprocess backend: fails at once, or
/// after some output, depending on the prompt.
fn failing_decoder(dir: &Path) -> PathBuf {
    let bin = dir.join("llama-completion");
    std::fs::write(
        &bin,
        "#!/bin/sh\nwhile [ \"$1\" != -f ]; do shift; done\ncase \"$(cat \"$2\")\" in\n  *FAIL_NOW*) echo 'model exploded' >&2; exit 1 ;;\n  *FAIL_LATER*) printf 'partial reply '; sleep 0.2; echo 'died midway' >&2; exit 3 ;;\n  *) printf 'fine' ;;\nesac\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&bin).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&bin, perms).unwrap();
    bin
}

#[test]
fn a_decoder_failure_fails_that_request_only() {
    let dir = tempfile::tempdir().unwrap();
    let bin = failing_decoder(dir.path());
    let server = Server::start(&[], &[("JEPA_DECODER_BIN", bin.to_str().unwrap())]);

    let (status, body) = server.post("/v1/chat/completions", &chat("FAIL_NOW please", 8));
    assert_eq!(status, 500, "{body}");
    // The client learns what failed; the log has why (the decoder's own
    // words, and the paths they hold).
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("the decoder failed"), "{body}");
    assert!(
        !message.contains("model exploded") && !message.contains(bin.to_str().unwrap()),
        "{body}"
    );
    let line = server.wait_for_log(&["status=500", "model exploded"]);
    assert!(line.contains("request_id=req-"), "{line}");

    // Mid-stream: the text so far, an error event, then [DONE].
    let events = server.stream(
        "/v1/chat/completions",
        &with(chat("FAIL_LATER please", 8), "stream", json!(true)),
    );
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let error: Value = serde_json::from_str(&events[n - 2]).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the decoder failed"),
        "{error}"
    );
    server.wait_for_log(&["generation failed", "died midway"]);
    let (text, _) = stream_text(
        &events[..n - 2]
            .iter()
            .cloned()
            .chain(["[DONE]".into()])
            .collect::<Vec<_>>(),
    );
    assert!(text.starts_with("partial reply"), "{text:?}");

    let (status, body) = server.post("/v1/chat/completions", &chat("all good", 8));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "fine");
}

#[test]
fn tool_calls_come_back_in_openai_form() {
    // The stub echoes the user's message, so the reply holds a call in the
    // Hermes syntax the prompt asks models for.
    let server = Server::start(&[], &[("JEPA_DECODER_BACKEND", "stub")]);
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }]);
    let call = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;
    let body = with(chat(call, 200), "tools", tools.clone());
    let (status, reply) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}));
    assert!(
        !choice["message"]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_call>")
    );

    let events = server.stream("/v1/chat/completions", &with(body, "stream", json!(true)));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert_eq!(deltas[0]["index"], 0);
    let arguments: String = deltas
        .iter()
        .map(|d| d["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // Without tools the same text is plain content.
    let (_, reply) = server.post("/v1/chat/completions", &chat(call, 200));
    assert!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_call>")
    );
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
}

#[test]
fn tools_and_a_whole_agent_conversation_reach_a_real_model() {
    let server = Server::start(&[], &[]);
    let body = json!({
        "messages": [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "max_tokens": 24,
        "temperature": 0,
    });
    let (status, reply) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap_or("");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(!content.is_empty() || calls > 0, "{reply}");
    // The earlier call and its result are in the prompt: without them it is shorter.
    let mut short = body.clone();
    short["messages"].as_array_mut().unwrap().truncate(2);
    let (_, short_reply) = server.post("/v1/chat/completions", &short);
    let tokens = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        tokens(&reply) >= tokens(&short_reply) + 20,
        "{reply} vs {short_reply}"
    );
    // And the tools are: without them it is shorter still.
    short.as_object_mut().unwrap().remove("tools");
    let (_, bare) = server.post("/v1/chat/completions", &short);
    assert!(
        tokens(&short_reply) >= tokens(&bare) + 50,
        "{short_reply} vs {bare}"
    );

    // Tools too long for the context: a 400 about the tools (a prompt is
    // never cut short behind the client's back).
    let mut body = with(
        chat("Hello!", 4),
        "tools",
        json!([{"type": "function", "function": {
            "name": "huge", "description": "a very long description ".repeat(1500), "parameters": {"type": "object"},
        }}]),
    );
    let (status, reply) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["code"], "context_length_exceeded");
    assert_eq!(reply["error"]["param"], "tools");
    // A conversation that is itself too long is about the messages.
    body["messages"][0]["content"] = json!("many words here ".repeat(2000));
    body.as_object_mut().unwrap().remove("tools");
    let (status, reply) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["code"], "context_length_exceeded");
    assert_eq!(reply["error"]["param"], "messages");
}

#[test]
fn the_seed_form_serves_and_bad_arguments_are_one_line() {
    let fixture = common::fixture_dir();
    let model = fixture.join("model_world_tiny.safetensors");
    let vocab = fixture.join("vocab_world.txt");
    let (model, vocab) = (model.to_str().unwrap(), vocab.to_str().unwrap());
    let server = Server::start_with(
        &[
            "--serve",
            model,
            vocab,
            "127.0.0.1:0",
            "48",
            "16",
            "2",
            "4",
            "24",
        ],
        &[],
    );
    let body = with(chat("Hi", 2), "tofy", json!({"return_conditioning": true}));
    let (status, reply) = server.post("/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["tofy"]["conditioning"]["vector"]
            .as_array()
            .unwrap()
            .len(),
        24
    );
    // No projector takes this world model's 24 values: the default mode is
    // the seed's text, not prefix.
    assert_eq!(reply["tofy"]["conditioning"]["cond_mode"], "text");
    drop(server);

    let run = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_tofy"))
            .args(args)
            .env("JEPA_DECODER_MODEL", common::smollm2())
            .output()
            .unwrap()
    };
    let line = common::fails(run(&["--serve", model, vocab, "127.0.0.1:0", "64"]));
    assert!(line.contains("dim"), "{line}");
    let line = common::fails(run(&["serve", "127.0.0.1:0", "x"]));
    assert!(line.contains("positive whole number"), "{line}");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap().to_string();
    let line = common::fails(run(&["serve", &address]));
    assert!(line.contains("cannot listen"), "{line}");
    let line = common::fails(run(&["serve", "127.0.0.1:0", "--parallel", "0"]));
    assert!(line.contains("parallel"), "{line}");
    let missing = Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(["serve", "127.0.0.1:0"])
        .env("JEPA_DECODER_MODEL", "/no/such/model.gguf")
        .output()
        .unwrap();
    let status = common::no_signal(missing.status, "tofy serve with a missing model");
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.lines().last().unwrap().starts_with("error: "),
        "{stderr}"
    );
    assert!(stderr.contains("no such file"), "{stderr}");
}

/// tests/clients: the official clients against a real server.
fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn run_client(server: &Server, program: &Path, script: &str) {
    assert!(
        program.exists(),
        "{} is missing: run scripts/setup-clients.sh (make test does)",
        program.display()
    );
    let out = Command::new(program)
        .arg(client_dir().join(script))
        .arg(&server.base)
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_openai_python_client_works() {
    let server = Server::start(&[], &[]);
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients-venv/bin/python");
    run_client(&server, &python, "openai_check.py");
}

#[test]
fn the_ai_sdk_works() {
    let server = Server::start(&[], &[]);
    let node = which::which("node").expect("node is installed (scripts/setup.sh)");
    assert!(
        client_dir().join("node_modules").is_dir(),
        "run scripts/setup-clients.sh (make test does)"
    );
    run_client(&server, &node, "ai_sdk_check.mjs");
}

#[test]
fn opencode_run_gets_a_reply() {
    // OpenCode's system prompt and tool schemas are ~7.7k SmolLM2 tokens,
    // and docs/opencode.json lets it ask for 512 more. An f16 cache: this
    // checks the client, and a long prefill was faster with matrix-product
    // attention than on the q8_0 cache's row-by-row path (docs/server.md).
    let server = Server::start(
        &["--ctx", "8704", "--parallel", "1", "--cache-type", "f16"],
        &[("JEPA_DECODER_THREADS", "2")],
    );
    assert!(
        client_dir().join("node_modules").is_dir(),
        "run scripts/setup-clients.sh (make test does)"
    );
    run_client(&server, Path::new("/bin/bash"), "opencode_check.sh");
}

/// The embedding rows of `tokens`, read from the GGUF.
fn token_rows(tokens: &[i32]) -> Vec<f32> {
    tofy::decoder::llama::ffi::TokenEmbeddings::open(&common::smollm2())
        .unwrap()
        .rows(tokens)
        .unwrap()
}

fn base64_rows(rows: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn prompt_embeds_and_tokenize_over_http() {
    let server = Server::start(&["--ctx", "256"], &[]);
    // /tokenize and /detokenize, in llama-server's shapes.
    let text = "The capital of France is";
    let (status, t) = server.post("/tokenize", &json!({ "content": text }));
    assert_eq!(status, 200, "{t}");
    let tokens: Vec<i32> = serde_json::from_value(t["tokens"].clone()).unwrap();
    assert!(tokens.len() >= 5, "{t}");
    let (status, d) = server.post("/detokenize", &json!({ "tokens": tokens }));
    assert_eq!((status, d["content"].as_str()), (200, Some(text)));
    let (status, e) = server.post("/detokenize", &json!({ "tokens": [1, -5] }));
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("tokens"))
    );

    // prompt_embeds, in both encodings, equals the text prompt (greedy).
    let complete = |body: Value| {
        let (status, reply) = server.post(
            "/v1/completions",
            &with(with(body, "max_tokens", json!(8)), "temperature", json!(0)),
        );
        assert_eq!(status, 200, "{reply}");
        reply
    };
    let by_text = complete(json!({ "prompt": text }));
    let rows = token_rows(&tokens);
    let n = tokens.len();
    let encoded = json!({ "shape": [n, 576], "data": base64_rows(&rows) });
    let listed: Vec<&[f32]> = rows.chunks(576).collect();
    for embeds in [encoded.clone(), json!(listed)] {
        let reply = complete(json!({ "prompt_embeds": embeds }));
        assert_eq!(reply["choices"][0]["text"], by_text["choices"][0]["text"]);
        assert_eq!(reply["usage"]["prompt_tokens"].as_u64(), Some(n as u64));
    }
    // The same rows again come from the cache.
    let again = complete(json!({ "prompt_embeds": encoded }));
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(n as u64 - 1)
    );
    // Rows first, then the text continues after them.
    let head = token_rows(&tokens[..1]);
    let rest = complete(json!({
        "prompt_embeds": { "shape": [1, 576], "data": base64_rows(&head) },
        "prompt": " capital",
    }));
    assert!(
        rest["usage"]["prompt_tokens"].as_u64().unwrap() >= 2,
        "{rest}"
    );

    // Each bad input is a 400 naming the parameter.
    let nan = base64_rows(&[f32::NAN; 576]);
    let bad: Vec<(Value, &str, &str)> = vec![
        (
            json!({ "shape": [1, 8], "data": base64_rows(&[0.5; 8]) }),
            "prompt_embeds",
            "input width (n_embd) is 576",
        ),
        (
            json!({ "shape": [2, 576], "data": base64_rows(&rows[..576]) }),
            "prompt_embeds",
            "needs 4608 bytes",
        ),
        (
            json!({ "shape": [100000000, 576], "data": "AAAA" }),
            "prompt_embeds",
            "do not fit the context",
        ),
        (
            json!({ "shape": [1, 576], "data": nan }),
            "prompt_embeds",
            "non-finite",
        ),
        (
            json!({ "shape": [1, 576], "data": "!".repeat(3072) }),
            "prompt_embeds",
            "not valid base64",
        ),
        (
            json!([vec![0.5; 576], vec![0.5; 3]]),
            "prompt_embeds",
            "row 1",
        ),
        (json!("rows"), "prompt_embeds", "send {"),
    ];
    for (embeds, param, want) in bad {
        let (status, e) = server.post(
            "/v1/completions",
            &json!({ "prompt_embeds": embeds, "max_tokens": 2 }),
        );
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["error"]["param"], param);
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{want}: {message}");
    }
    // Rows and text together past the context.
    let (status, e) = server.post(
        "/v1/completions",
        &json!({
            "prompt_embeds": { "shape": [200, 576], "data": base64_rows(&vec![0.01; 200 * 576]) },
            "prompt": "word ".repeat(100),
            "max_tokens": 2,
        }),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["error"]["param"], "prompt");
    // The server is still well.
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn prefix_mode_chat_carries_the_world_vector_in_rows() {
    let server = Server::start(&["--ctx", "512"], &[]);
    let ask = |tofy: Value| {
        let body = with(
            chat("write a short gpu recommendation", 6),
            "tofy",
            with(tofy, "return_conditioning", json!(true)),
        );
        let (status, reply) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        reply
    };
    let usage = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    let text = ask(json!({ "cond_mode": "text" }));
    let prefix = ask(json!({ "cond_mode": "prefix" }));
    // No mode named: prefix, the embedded projector being made for this GGUF.
    let default = ask(json!({}));
    assert_eq!(default["tofy"]["conditioning"]["cond_mode"], "prefix");
    let none = ask(json!({ "cond_mode": "none" }));
    let report = &prefix["tofy"]["conditioning"];
    assert_eq!(report["cond_mode"], "prefix");
    assert_eq!(report["k"], 4);
    assert_eq!(report["vector"].as_array().unwrap().len(), 256);
    assert_eq!(text["tofy"]["conditioning"]["cond_mode"], "text");
    assert!(
        usage(&none) < usage(&prefix) && usage(&prefix) + 40 < usage(&text),
        "none {} / prefix {} / text {}",
        usage(&none),
        usage(&prefix),
        usage(&text)
    );
    assert_eq!(none["tofy"]["conditioning"]["k"], 0);

    // The caller's own rows, or its own world vector through the projector.
    let rows = token_rows(&[28, 29, 30]);
    let own = ask(json!({
        "prefix_embeddings": { "shape": [3, 576], "data": base64_rows(&rows) },
    }));
    assert_eq!(own["tofy"]["conditioning"]["k"], 3);
    assert_eq!(usage(&own), usage(&prefix) - 1);
    let vector = ask(json!({ "conditioning": vec![0.1; 256] }));
    assert_eq!(vector["tofy"]["conditioning"]["k"], 4);
    assert_eq!(vector["tofy"]["conditioning"]["world_tokens"], 0);

    for (tofy, param) in [
        (json!({ "conditioning": [0.1, 0.2] }), "tofy.conditioning"),
        (
            json!({ "prefix_embeddings": [[0.5, 0.5]] }),
            "tofy.prefix_embeddings",
        ),
        // Finite, but far beyond a world vector's range: it could only
        // overflow the projection.
        (
            json!({ "conditioning": vec![3e38; 256] }),
            "tofy.conditioning",
        ),
        (
            json!({ "conditioning": vec![2e6; 256] }),
            "tofy.conditioning",
        ),
        (
            json!({ "prefix_embeddings": [vec![0.5; 576]], "ablate_conditioning": true }),
            "tofy.ablate_conditioning",
        ),
    ] {
        let (status, e) = server.post("/v1/chat/completions", &with(chat("hi", 2), "tofy", tofy));
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    let (status, e) = server.post(
        "/v1/chat/completions",
        &with(chat("hi", 2), "tofy", json!({ "cond_mode": "vectors" })),
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text, prefix, cvec or none")
    );
    // cvec needs a control map, which this server was not given.
    let (status, e) = server.post(
        "/v1/chat/completions",
        &with(chat("hi", 2), "tofy", json!({ "cond_mode": "cvec" })),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "tofy.cond_mode", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs a control map"),
        "{e}"
    );
}

#[test]
fn cvec_mode_per_request_beside_plain_requests() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("control.safetensors");
    common::write_control_map(&map);
    let map = map.display().to_string();
    let server = Server::start(&["--ctx", "512", "--parallel", "2", "--control", &map], &[]);
    let ask = |mode: &str| {
        let body = with(
            with(
                chat("write a short gpu recommendation", 10),
                "temperature",
                json!(0),
            ),
            "tofy",
            json!({ "cond_mode": mode, "return_conditioning": true }),
        );
        let (status, reply) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        reply
    };
    let content = |r: &Value| {
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let none = ask("none");
    let cvec = ask("cvec");
    assert_eq!(cvec["tofy"]["conditioning"]["cond_mode"], "cvec");
    assert_eq!(
        cvec["usage"]["prompt_tokens"],
        none["usage"]["prompt_tokens"]
    );
    assert_ne!(
        content(&cvec),
        content(&none),
        "the vector steers the reply"
    );
    // Both at once: each as it was alone.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| ask("cvec"));
        let b = s.spawn(|| ask("none"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!((content(&a), content(&b)), (content(&cvec), content(&none)));
}

#[test]
fn a_queued_stream_gets_headers_at_once_and_keep_alives() {
    let server = Server::start(&["--parallel", "1", "--sse-keepalive", "0.3"], &[]);
    let long = with(chat("Count to one thousand.", 3000), "stream", json!(true));
    let long = with(long, "ignore_eos", json!(true));
    let mut running = server.open_stream("/v1/chat/completions", &long);
    let mut line = String::new();
    running.read_line(&mut line).unwrap();
    // The one sequence is busy: this stream waits in the queue, yet its
    // headers (checked by open_stream), its role chunk and then keep-alive
    // comments arrive while it waits.
    let queued = with(chat("Hi", 2), "stream", json!(true));
    let mut waiting = server.open_stream("/v1/chat/completions", &queued);
    let mut lines = Vec::new();
    while lines
        .iter()
        .filter(|l: &&String| l.starts_with(": keep-alive"))
        .count()
        < 2
    {
        let mut line = String::new();
        waiting.read_line(&mut line).unwrap();
        lines.push(line);
    }
    assert!(lines[0].contains(r#""role":"assistant""#), "{lines:?}");
    assert_eq!(server.metric("tofy_sequences_queued"), 1.0);
    // Once the running stream goes, the queued one gets its reply.
    drop(running);
    let (text, last) = stream_text(
        &std::iter::once(lines[0].trim().strip_prefix("data: ").unwrap().to_string())
            .chain(events(waiting))
            .collect::<Vec<_>>(),
    );
    assert!(!text.is_empty(), "{last}");
}

#[test]
fn json_logs_have_one_line_per_generation_and_no_prompt_or_key() {
    let server = Server::start(
        &["--log-format", "json", "--api-key", "k3y-s3cret"],
        &[("RUST_LOG", "info")],
    );
    let (status, body, id) = server.post_with_id(
        "/v1/chat/completions",
        &chat("a secret prompt about zebras", 4).to_string(),
        Some("k3y-s3cret"),
        Some("client-id-42"),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        id.as_deref(),
        Some("client-id-42"),
        "the client's id echoed"
    );
    let line = server.wait_for_log(&["generation finished", "client-id-42"]);
    let value: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["level"], "INFO");
    assert!(value["fields"]["completion_tokens"].as_u64().unwrap() >= 1);
    let span = &value["span"];
    assert!(
        span["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{line}"
    );
    // A 4xx is logged with its cause; a fresh id when the client sent none.
    let (status, _, id) = server.post_with_id(
        "/v1/chat/completions",
        r#"{"messages": []}"#,
        Some("k3y-s3cret"),
        None,
    );
    assert_eq!(status, 400);
    let id = id.unwrap();
    assert!(id.starts_with("req-"), "{id}");
    server.wait_for_log(&[&id, "messages is empty"]);
    for line in server.log() {
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            !line.contains("zebras") && !line.contains("k3y-s3cret"),
            "{line}"
        );
    }
}
