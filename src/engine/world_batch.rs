//! World-model calls from concurrent requests, run as batches.
//!
//! One thread owns the forward passes: it sleeps until a prompt comes, then
//! takes every prompt that arrived meanwhile (up to [`MAX_BATCH`]) into one
//! batched forward. No timer: a lone request is never delayed, and requests
//! that pile up while a batch runs form the next one.

use std::sync::Arc;
use std::sync::mpsc;

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

/// The handle requests call; cheap to clone.
#[derive(Clone)]
pub struct WorldBatcher {
    calls: mpsc::Sender<Call>,
}

impl WorldBatcher {
    pub fn start(world: Arc<WorldModel>) -> std::io::Result<Self> {
        let (calls, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("tofy-world".into())
            .spawn(move || run(&world, &rx))?;
        Ok(Self { calls })
    }

    /// The conditioning for `prompt`, blocking until its batch ran.
    pub fn condition(&self, prompt: &str, ablate: bool) -> Result<Conditioning, String> {
        let (reply, rx) = mpsc::sync_channel(1);
        let call = Call {
            prompt: prompt.to_string(),
            ablate,
            reply,
        };
        let gone = || "the world-model thread stopped".to_string();
        self.calls.send(call).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

fn run(world: &WorldModel, calls: &mpsc::Receiver<Call>) {
    while let Ok(first) = calls.recv() {
        let mut batch = vec![first];
        batch.extend(calls.try_iter().take(MAX_BATCH - 1));
        for ablate in [false, true] {
            let group: Vec<&Call> = batch.iter().filter(|c| c.ablate == ablate).collect();
            if group.is_empty() {
                continue;
            }
            let prompts: Vec<&str> = group.iter().map(|c| c.prompt.as_str()).collect();
            match condition_all(world, &prompts, ablate) {
                Ok(results) => {
                    for (call, result) in group.iter().zip(results) {
                        let _ = call.reply.send(Ok(result));
                    }
                }
                Err(err) => reply_all(&group, &err),
            }
        }
    }
}

fn reply_all(group: &[&Call], err: &WorldError) {
    for call in group {
        let _ = call.reply.send(Err(err.to_string()));
    }
}
