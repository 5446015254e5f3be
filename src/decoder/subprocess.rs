//! The seed's backend: one `llama-completion` process per request
//! (`JEPA_DECODER_BIN`), with the seed's flags. Its stdout is streamed as it
//! arrives, minus any echo of the prompt and llama.cpp's `[end of text]`
//! marker; token counts come from the timing lines it prints on stderr. The
//! child is killed when the caller cancels, and on drop.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::stop::StopScanner;
use super::{
    Accepted, BackendKind, Decoder, DecoderConfig, DecoderError, Deferred, FinishReason,
    GenerateRequest, Generation, Prompt, Sink, prompt,
};

/// What llama.cpp's completion tool prints when the model ends its turn.
const END_OF_TEXT: &str = " [end of text]";

/// Runs `JEPA_DECODER_BIN` for every request.
#[derive(Debug)]
pub struct SubprocessDecoder {
    model: PathBuf,
    config: DecoderConfig,
    /// Set by `shutdown`: running children are killed, new requests refused.
    stop: Arc<AtomicBool>,
    /// Children running now; `shutdown` waits for none.
    running: Arc<AtomicUsize>,
}

/// One running child, counted until it has been reaped.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SubprocessDecoder {
    pub fn new(model: PathBuf, config: &DecoderConfig) -> Self {
        Self {
            model,
            config: config.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The command line for one request (the seed's flags, the prompt read
    /// from `prompt_file`).
    pub fn command(&self, prompt_file: &Path, request: &GenerateRequest) -> Command {
        let s = &request.sampling;
        let mut cmd = Command::new(&self.config.bin);
        cmd.arg("-m").arg(&self.model);
        cmd.arg("-f").arg(prompt_file);
        cmd.args(["-n", &request.max_new_tokens.to_string()]);
        cmd.args(["-c", &self.config.ctx.to_string()]);
        cmd.args(["-ngl", &self.config.ngl.to_string()]);
        cmd.args(["-t", &self.config.threads.to_string()]);
        cmd.args(["--temp", &s.temperature.to_string()]);
        cmd.args(["--repeat-penalty", &s.repeat_penalty.to_string()]);
        cmd.args(["--top-k", &s.top_k.to_string()]);
        cmd.args(["--top-p", &s.top_p.to_string()]);
        cmd.args(["--min-p", &s.min_p.to_string()]);
        if request.ignore_eos {
            cmd.arg("--ignore-eos");
        }
        if let Some(seed) = s.seed {
            cmd.args(["--seed", &seed.to_string()]);
        }
        // Plain completion of the prompt we formatted, no interactive chat,
        // and the prompt taken literally (llama.cpp unescapes \n and \\ by default).
        cmd.args(["--no-display-prompt", "-no-cnv", "--no-escape"]);
        cmd
    }
}

/// Kills (with its process group) and reaps the child unless it already
/// finished.
struct ChildGuard(Child);

impl ChildGuard {
    fn kill_group(&mut self) {
        if let Ok(None) = self.0.try_wait()
            && let Ok(pid) = i32::try_from(self.0.id())
        {
            // SAFETY: kill(2) with a negative pid signals the process group
            // the child leads (process_group(0) made it a leader).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.0.wait();
    }
}

impl Decoder for SubprocessDecoder {
    fn backend(&self) -> BackendKind {
        BackendKind::Subprocess
    }

    fn model_path(&self) -> Option<&Path> {
        Some(&self.model)
    }

    fn context_size(&self) -> Option<usize> {
        Some(self.config.ctx as usize)
    }

    /// Kills every running child (each request's watcher sees the flag
    /// within 50 ms) and waits until all are reaped: no llama-completion
    /// outlives the server.
    fn shutdown(&self, within: Duration) -> Result<(), DecoderError> {
        self.stop.store(true, Ordering::Release);
        if crate::exit::within(within, || self.running.load(Ordering::Acquire) == 0) {
            Ok(())
        } else {
            Err(DecoderError::StopTimeout {
                what: "a llama-completion child",
                within,
            })
        }
    }

    fn submit<'d>(
        &'d self,
        request: &GenerateRequest,
    ) -> Result<Box<dyn Accepted + 'd>, DecoderError> {
        if request.control.is_some() {
            return Err(self.unsupported("apply a control vector"));
        }
        // llama-completion reads text only.
        let text = request
            .prompt
            .plain_text()
            .ok_or_else(|| self.unsupported("take embedding rows or token ids"))?;
        let request = request.clone();
        Ok(Box::new(Deferred(move |sink: &mut Sink<'_>| {
            self.run(&text, &request, sink)
        })))
    }
}

impl SubprocessDecoder {
    fn run(
        &self,
        text: &str,
        request: &GenerateRequest,
        sink: &mut Sink<'_>,
    ) -> Result<Generation, DecoderError> {
        let start = Instant::now();
        // Counted first, then the flag read: a shutdown that set the flag
        // either sees this request counted or this request sees the flag.
        self.running.fetch_add(1, Ordering::AcqRel);
        let _running = Running(Arc::clone(&self.running));
        if self.stop.load(Ordering::Acquire) {
            return Err(DecoderError::ShuttingDown);
        }
        // The prompt goes in a file: an argument is limited in length (128
        // KiB on Linux), a file is not.
        let prompt_file = prompt_file(text)?;
        let mut command = self.command(prompt_file.path(), request);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a wrapper script's children
            // are killed with it.
            .process_group(0);
        let mut child = ChildGuard(command.spawn().map_err(|source| match source.kind() {
            ErrorKind::NotFound | ErrorKind::PermissionDenied => DecoderError::BinaryNotFound {
                bin: self.config.bin.clone(),
                source,
            },
            _ => DecoderError::Io(source),
        })?);
        // A cancel is seen even while the child prints nothing (reading a
        // long prompt): the watcher kills it, and the read below ends.
        let mut watch =
            CancelWatch::start(request.cancel.clone(), Arc::clone(&self.stop), &child.0);
        let mut stdout = child.0.stdout.take().expect("stdout is piped");
        let mut stderr = child.0.stderr.take().expect("stderr is piped");
        // stderr is drained on its own thread so a chatty child never blocks.
        let stderr_reader = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = stderr.read_to_string(&mut all);
            all
        });

        let mut stops = match request.prompt {
            Prompt::Chat { .. } => prompt::plain_layout_stops(),
            Prompt::Raw(_) => Vec::new(),
        };
        stops.extend(request.stop.iter().cloned());
        // Two scanners: llama.cpp's own end marker (the child then exits by
        // itself and prints its token counts) and the stop strings (the
        // child is still generating and is killed).
        let mut end_marker = StopScanner::new(&[END_OF_TEXT.to_string()]);
        let mut scanner = StopScanner::new(&stops);
        let mut echo = EchoStripper::new(text);
        let mut utf8 = encoding_rs::UTF_8.new_decoder_without_bom_handling();
        let mut out = Emitter::new(start, sink);
        let mut buf = [0u8; 4096];
        let mut finish = FinishReason::Length;
        // Set when we end the child early (a stop string or cancellation).
        let mut kill = false;
        loop {
            let n = stdout.read(&mut buf)?;
            let at_end = n == 0;
            let mut piece =
                String::with_capacity(utf8.max_utf8_buffer_length(n).unwrap_or(4 * n + 16));
            let _ = utf8.decode_to_string(&buf[..n], &mut piece, at_end);
            let mut marked = end_marker.push(&echo.push(&piece, at_end));
            if at_end {
                marked.text.push_str(&end_marker.finish());
            }
            let mut released = scanner.push(&marked.text);
            if (at_end || marked.stopped) && !released.stopped {
                released.text.push_str(&scanner.finish());
            }
            if !out.emit(&released.text) {
                (finish, kill) = (FinishReason::Cancelled, true);
                break;
            }
            if released.stopped {
                (finish, kill) = (FinishReason::Stop, true);
                break;
            }
            if marked.stopped {
                // The model ended its turn; let the child finish and exit.
                std::io::copy(&mut stdout, &mut std::io::sink())?;
                finish = FinishReason::Stop;
                break;
            }
            if at_end {
                break;
            }
        }
        if watch.stop() {
            (finish, kill) = (FinishReason::Cancelled, true);
        }
        let shutting_down = kill && self.stop.load(Ordering::Acquire);
        // llama.cpp prints "\n\n" after a generation that hit -n, before its
        // timings: not the model's text.
        out.finish(finish == FinishReason::Length);
        if kill {
            // Ended early: the child must not keep generating into a pipe
            // nobody reads.
            drop(stdout);
            child.kill_group();
        }
        let status = child.0.wait()?;
        let stderr_text = stderr_reader.join().unwrap_or_default();
        if shutting_down {
            return Err(DecoderError::ShuttingDown);
        }
        if !kill && !status.success() {
            if let Some((prompt_tokens, context)) = prompt_too_long(&stderr_text) {
                return Err(DecoderError::ContextExceeded {
                    prompt_tokens,
                    context,
                });
            }
            return Err(DecoderError::ProcessFailed {
                bin: self.config.bin.clone(),
                status: status.to_string(),
                stderr_tail: tail(&stderr_text),
            });
        }
        let counts = PerfCounts::parse(&stderr_text);
        // llama.cpp counts evaluations: after an end of turn every emitted
        // token was evaluated; at the -n limit the last one was not.
        let completion_tokens = match finish {
            FinishReason::Length => (counts.evaluated + 1).min(request.max_new_tokens),
            _ => counts.evaluated,
        };
        Ok(Generation {
            text: out.text,
            finish_reason: finish,
            prompt_tokens: counts.prompt,
            completion_tokens,
            time_to_first_token: out.first.unwrap_or_else(|| start.elapsed()),
            cached_tokens: 0,
            prompt_time: None,
            total_time: start.elapsed(),
        })
    }
}

/// Kills a child's process group when its request's cancel flag or the
/// decoder's stop flag is set, checking every 50 ms until stopped. Stopped (and joined) before the
/// child is reaped, so its pid cannot have been reused.
struct CancelWatch {
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CancelWatch {
    fn start(cancel: Option<Arc<AtomicBool>>, stop: Arc<AtomicBool>, child: &Child) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let pid = i32::try_from(child.id()).ok();
        let thread = pid.map(|pid| {
            let (done, fired) = (Arc::clone(&done), Arc::clone(&fired));
            let given_up = move || {
                stop.load(Ordering::Acquire)
                    || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
            };
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    if given_up() {
                        fired.store(true, Ordering::Release);
                        // SAFETY: as in ChildGuard::kill_group; the child is
                        // not reaped while this thread runs.
                        unsafe {
                            libc::kill(-pid, libc::SIGKILL);
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        });
        Self {
            done,
            fired,
            thread,
        }
    }

    /// Stops watching (the watcher has ended when this returns); whether
    /// it killed the child.
    fn stop(&mut self) -> bool {
        self.done.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.fired.load(Ordering::Acquire)
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The prompt in a temporary file for `-f`, removed on drop. llama.cpp
/// drops one trailing newline of a prompt file, so one is added for it.
fn prompt_file(text: &str) -> Result<tempfile::NamedTempFile, DecoderError> {
    let mut file = tempfile::Builder::new()
        .prefix("tofy-prompt-")
        .suffix(".txt")
        .tempfile()?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.flush()?;
    Ok(file)
}

/// Hands text to the sink, holding trailing newlines back until more text
/// follows (so that llama.cpp's closing "\n\n" can be told apart).
struct Emitter<'s, 'a> {
    start: Instant,
    sink: &'s mut Sink<'a>,
    text: String,
    newlines: String,
    first: Option<std::time::Duration>,
}

impl<'s, 'a> Emitter<'s, 'a> {
    fn new(start: Instant, sink: &'s mut Sink<'a>) -> Self {
        Self {
            start,
            sink,
            text: String::new(),
            newlines: String::new(),
            first: None,
        }
    }

    /// False when the sink asks to stop.
    fn emit(&mut self, piece: &str) -> bool {
        let body = piece.trim_end_matches('\n');
        if body.is_empty() {
            self.newlines.push_str(piece);
            return true;
        }
        let mut out = std::mem::take(&mut self.newlines);
        out.push_str(body);
        self.newlines.push_str(&piece[body.len()..]);
        self.send(&out)
    }

    fn send(&mut self, piece: &str) -> bool {
        if piece.is_empty() {
            return true;
        }
        self.first.get_or_insert_with(|| self.start.elapsed());
        self.text.push_str(piece);
        (self.sink)(piece).is_continue()
    }

    /// Releases held newlines, less llama.cpp's closing two when asked.
    fn finish(&mut self, drop_closing: bool) {
        let mut held = std::mem::take(&mut self.newlines);
        if drop_closing {
            held.truncate(held.len().saturating_sub(2));
        }
        self.send(&held);
    }
}

/// `prompt is too long (N tokens, max M)` from llama.cpp's completion tool.
fn prompt_too_long(stderr: &str) -> Option<(usize, usize)> {
    let line = stderr
        .lines()
        .find(|l| l.contains("prompt is too long ("))?;
    let inside = line.split("prompt is too long (").nth(1)?;
    let mut numbers = inside
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(str::parse::<usize>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}

/// The last non-empty stderr lines, for an error message.
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "no output on stderr".to_string()
    } else {
        tail
    }
}

/// Drops a leading echo of the prompt (older builds ignore
/// `--no-display-prompt`): text is held while it is still a prefix of the
/// prompt, dropped once the whole prompt has been seen, released as soon as
/// it differs.
struct EchoStripper {
    prompt: String,
    held: String,
    settled: bool,
}

impl EchoStripper {
    fn new(prompt: &str) -> Self {
        Self {
            prompt: prompt.to_string(),
            held: String::new(),
            settled: false,
        }
    }

    fn push(&mut self, piece: &str, at_end: bool) -> String {
        if self.settled {
            return piece.to_string();
        }
        self.held.push_str(piece);
        let trimmed = self.held.trim_start();
        if let Some(rest) = trimmed.strip_prefix(self.prompt.as_str()) {
            self.settled = true;
            let rest = rest.to_string();
            self.held.clear();
            return rest;
        }
        if self.prompt.starts_with(trimmed) && !at_end {
            return String::new();
        }
        self.settled = true;
        std::mem::take(&mut self.held)
    }
}

/// Token counts from llama.cpp's `llama_perf_context_print` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct PerfCounts {
    prompt: usize,
    /// Single-token evaluations ("runs").
    evaluated: usize,
}

impl PerfCounts {
    /// `prompt eval time = … / 12 tokens (…)` and `eval time = … / 33 runs (…)`.
    fn parse(stderr: &str) -> Self {
        let count = |line: &str| -> Option<usize> {
            let after = line.split(" / ").nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        };
        let mut counts = Self::default();
        for line in stderr
            .lines()
            .filter(|l| l.contains("llama_perf_context_print"))
        {
            if line.contains("prompt eval time") {
                counts.prompt = count(line).unwrap_or(0);
            } else if line.contains(" eval time") {
                counts.evaluated = count(line).unwrap_or(0);
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_dropped_and_other_text_passes() {
        let mut e = EchoStripper::new("User: hi\nAssistant:");
        assert_eq!(e.push("User: hi", false), "");
        assert_eq!(e.push("\nAssistant: Hello", false), " Hello");
        assert_eq!(e.push(" again", false), " again");
        let mut e = EchoStripper::new("User: hi\nAssistant:");
        assert_eq!(e.push("Us", false), "");
        assert_eq!(e.push("ually yes", false), "Usually yes");
    }

    #[test]
    fn prompt_too_long_is_read_from_stderr() {
        assert_eq!(
            prompt_too_long("main: error: prompt is too long (5000 tokens, max 4092)\n"),
            Some((5000, 4092))
        );
        assert_eq!(prompt_too_long("other failure"), None);
    }

    #[test]
    fn perf_lines_give_token_counts() {
        let stderr = "\
llama_perf_context_print:        load time =     101.10 ms
llama_perf_context_print: prompt eval time =      50.00 ms /    12 tokens (    4.17 ms per token)
llama_perf_context_print:        eval time =     300.00 ms /    33 runs   (    9.09 ms per token)
";
        assert_eq!(
            PerfCounts::parse(stderr),
            PerfCounts {
                prompt: 12,
                evaluated: 33
            }
        );
    }
}
