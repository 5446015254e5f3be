//! `tofy serve` as a real process on a loopback port, and the HTTP helpers
//! the server tests share.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running `tofy serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
    agent: ureq::Agent,
    /// Every line the server wrote to stderr so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// `tofy serve 127.0.0.1:0 ARGS` on SmolLM2 with the embedded world
    /// model, waiting until /health says ready.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(&[&["serve", "127.0.0.1:0"], args].concat(), env)
    }

    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let server = Self::spawn(args, env);
        server.wait_until(
            || server.get("/health").0 == 200,
            "the server to become ready",
        );
        server
    }

    /// `tofy ARGS`, returned once it listens (its model may still be
    /// loading).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tofy"));
        for (key, _) in std::env::vars() {
            if key.starts_with("JEPA_DECODER_") || key.starts_with("TOFY_") {
                cmd.env_remove(key);
            }
        }
        cmd.args(args)
            .env("JEPA_DECODER_MODEL", super::smollm2())
            .env("JEPA_DECODER_THREADS", "1")
            .env("JEPA_DECODER_NGL", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start tofy serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = listening(&line) {
                    let _ = tx.send(address);
                }
                eprintln!("[server] {line}");
                lines.lock().unwrap().push(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("tofy serve printed its address");
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        );
        Self {
            child,
            base,
            agent,
            log,
        }
    }

    /// How the server ended (waited for with a hang guard); a death by a
    /// signal fails the test.
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        super::exit_status(&mut self.child, "tofy serve")
    }

    /// Sends `signal` (SIGTERM, SIGINT) to the server.
    pub fn signal(&self, signal: libc::c_int) {
        super::signal(&self.child, signal);
    }

    /// The stderr lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a stderr line contains every one of `needles`; that line.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let mut found = None;
        self.wait_until(
            || {
                found = self
                    .log()
                    .into_iter()
                    .find(|l| needles.iter().all(|n| l.contains(n)));
                found.is_some()
            },
            &format!("a log line with {needles:?}"),
        );
        found.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.agent.get(self.url(path)).call().expect("GET");
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    /// A GET: its status, the value of `header`, and its body.
    pub fn get_header(&self, path: &str, header: &str) -> (u16, Option<String>, String) {
        let mut r = self.agent.get(self.url(path)).call().expect("GET");
        let value = r
            .headers()
            .get(header)
            .map(|v| v.to_str().unwrap().to_string());
        (
            r.status().as_u16(),
            value,
            r.body_mut().read_to_string().unwrap(),
        )
    }

    /// A GET that may find the server gone: `None` when it could not connect.
    pub fn get_or_gone(&self, path: &str) -> (Option<u16>, String) {
        match self.agent.get(self.url(path)).call() {
            Ok(mut r) => (
                Some(r.status().as_u16()),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(e) => (None, e.to_string()),
        }
    }

    pub fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let (status, text, _) = self.post_with_id(path, body, key, None);
        (status, text)
    }

    /// A POST with an optional key and `x-request-id`; the status, body
    /// and the `x-request-id` that came back.
    pub fn post_with_id(
        &self,
        path: &str,
        body: &str,
        key: Option<&str>,
        id: Option<&str>,
    ) -> (u16, String, Option<String>) {
        let mut request = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json");
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        let mut r = request.send(body).expect("POST");
        let id = r
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap();
        (r.status().as_u16(), text, id)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &body.to_string(), None);
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        (status, value)
    }

    /// A streaming request; the `data:` payloads as the server sent them.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        events(self.open_stream(path, body))
    }

    pub fn open_stream(&self, path: &str, body: &Value) -> BufReader<impl Read + use<>> {
        let r = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .expect("POST");
        assert_eq!(r.status().as_u16(), 200);
        let content_type = r.headers().get("content-type").unwrap().to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        BufReader::new(r.into_body().into_reader())
    }

    /// The value of the first `name` series (whatever its labels).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                let rest = match rest.strip_prefix('{') {
                    Some(labels) => &labels[labels.find('}')? + 1..],
                    None => rest,
                };
                rest.strip_prefix(' ')?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Polls `ok` (a hang guard, not a timing assertion).
    pub fn wait_until(&self, mut ok: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ok() {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of a `listening` line, in the text or the JSON log format.
fn listening(line: &str) -> Option<String> {
    if let Some(address) = line.strip_prefix("tofy serve: listening on ") {
        return Some(address.to_string());
    }
    let value: Value = serde_json::from_str(line).ok()?;
    if value["fields"]["message"] != "listening" {
        return None;
    }
    Some(format!("http://{}", value["fields"]["address"].as_str()?))
}

/// The `data:` payloads of an SSE body, up to and including `[DONE]`
/// (comments, such as keep-alives, skipped).
pub fn events(reader: impl BufRead) -> Vec<String> {
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.expect("read the stream");
        if let Some(data) = line.strip_prefix("data: ") {
            out.push(data.to_string());
            if data == "[DONE]" {
                break;
            }
        } else {
            assert!(
                line.is_empty() || line.starts_with(':'),
                "only data lines, comments and blank lines: {line:?}"
            );
        }
    }
    out
}

pub fn chat(prompt: &str, max_tokens: u32) -> Value {
    json!({
        "model": "tofy",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

pub fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// The reply text of a chat stream, checking OpenAI's framing on the way.
pub fn stream_text(events: &[String]) -> (String, Value) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = Value::Null;
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"]);
        if let Some(choice) = chunk["choices"].get(0) {
            assert!(finish.is_null(), "nothing after the finish_reason chunk");
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            finish = choice["finish_reason"].clone();
        }
    }
    (text, chunks.last().unwrap().clone())
}
