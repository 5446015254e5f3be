//! World-model calls from concurrent requests, run as batches.
//!
//! One thread owns the forward passes: it sleeps until a prompt comes, then
//! takes every prompt that arrived meanwhile (up to [`MAX_BATCH`]) into one
//! batched forward. No timer: a lone request is never delayed, and requests
//! that pile up while a batch runs form the next one. A batch that fails
//! (or panics) is run again one prompt at a time, so a failure stays with
//! the request that caused it.
//!
//! [`WorldBatcher::shutdown`] stops the thread before the process exits
//! (a CUDA world model's context must not be torn down under a forward
//! pass); calls still waiting are answered with an error.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::conditioning::Conditioning;
use crate::engine::condition_all;
use crate::world::{WorldError, WorldModel};

/// Prompts per forward pass at most.
pub const MAX_BATCH: usize = 16;

struct Call {
    prompt: String,
    ablate: bool,
    reply: mpsc::SyncSender<Result<Conditioning, String>>,
}

/// What the thread's channel carries.
enum Message {
    Call(Call),
    /// End after the batch in progress.
    Stop,
}

/// The handle requests call.
pub struct WorldBatcher {
    calls: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

impl WorldBatcher {
    pub fn start(world: Arc<WorldModel>) -> std::io::Result<Self> {
        let (calls, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tofy-world".into())
            .spawn(move || run(&world, &rx))?;
        Ok(Self {
            calls,
            thread: Some(thread),
        })
    }

    /// Stops the thread once its batch in progress is done, waiting at
    /// most `within`; false if it is still running then.
    pub fn shutdown(&self, within: Duration) -> bool {
        let _ = self.calls.send(Message::Stop);
        self.thread
            .as_ref()
            .is_none_or(|t| crate::exit::within(within, || t.is_finished()))
    }

    /// The conditioning for `prompt`, blocking until its batch ran.
    pub fn condition(&self, prompt: &str, ablate: bool) -> Result<Conditioning, String> {
        let (reply, rx) = mpsc::sync_channel(1);
        let call = Call {
            prompt: prompt.to_string(),
            ablate,
            reply,
        };
        let gone =
            || "the world-model thread has stopped (the server is shutting down)".to_string();
        self.calls.send(Message::Call(call)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

impl Drop for WorldBatcher {
    fn drop(&mut self) {
        let _ = self.calls.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Batches until a stop; calls queued behind the stop are dropped
/// unanswered (their callers see the thread gone).
fn run(world: &WorldModel, calls: &mpsc::Receiver<Message>) {
    while let Ok(Message::Call(first)) = calls.recv() {
        let mut batch = vec![first];
        let mut stop = false;
        while batch.len() < MAX_BATCH {
            match calls.try_recv() {
                Ok(Message::Call(call)) => batch.push(call),
                Ok(Message::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        forward(world, &batch);
        if stop {
            return;
        }
    }
}

/// One batch's forward passes (plain and ablated prompts apart), each
/// call answered.
fn forward(world: &WorldModel, batch: &[Call]) {
    for ablate in [false, true] {
        let group: Vec<&Call> = batch.iter().filter(|c| c.ablate == ablate).collect();
        if group.is_empty() {
            continue;
        }
        let prompts: Vec<&str> = group.iter().map(|c| c.prompt.as_str()).collect();
        match guarded(world, &prompts, ablate) {
            Ok(results) => {
                for (call, result) in group.iter().zip(results) {
                    let _ = call.reply.send(Ok(result));
                }
            }
            // One prompt's failure is its own: each runs alone again.
            Err(_) if group.len() > 1 => {
                for call in group {
                    let result = guarded(world, &[call.prompt.as_str()], ablate)
                        .map(|mut one| one.remove(0));
                    let _ = call.reply.send(result);
                }
            }
            Err(err) => {
                for call in group {
                    let _ = call.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// One batched forward pass; a panic in it is an error like any other, so
/// the thread lives on for the next batch.
fn guarded(
    world: &WorldModel,
    prompts: &[&str],
    ablate: bool,
) -> Result<Vec<Conditioning>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for prompt in prompts {
            crate::fault::inject(crate::fault::Point::World, || *prompt);
        }
        condition_all(world, prompts, ablate).map_err(|e: WorldError| e.to_string())
    }))
    .unwrap_or_else(|payload| {
        Err(format!(
            "the world model panicked: {}",
            crate::fault::panic_message(payload.as_ref())
        ))
    })
}
