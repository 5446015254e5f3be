//! The in-process llama.cpp backend on the real SmolLM2-135M GGUF: greedy
//! determinism, max_new_tokens, stop strings, cancellation, the context
//! limit, and bad model files.

mod common;

use std::ops::ControlFlow;

use tofy::decoder::llama::LlamaDecoder;
use tofy::decoder::{
    CacheType, ChatMessage, Decoder, DecoderConfig, DecoderError, FinishReason, GenerateRequest,
    Generation, Role, Sampling,
};

use common::{cancel_after, generate_collecting as generate};

fn config(ctx: u32) -> DecoderConfig {
    DecoderConfig {
        ctx,
        ngl: 0,
        // Two test binaries may generate at once on a 2-core machine.
        threads: 1,
        ..DecoderConfig::default()
    }
}

fn load(ctx: u32) -> LlamaDecoder {
    LlamaDecoder::load(&common::smollm2(), &config(ctx)).expect("load SmolLM2")
}

fn request(prompt: &str, max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest::chat(
        vec![
            ChatMessage::new(Role::System, "You are a helpful assistant."),
            ChatMessage::new(Role::User, prompt),
        ],
        max_new_tokens,
        Sampling::greedy(),
    )
}

#[test]
fn greedy_is_deterministic_streams_and_honours_max_new_tokens() {
    let decoder = load(1024);
    let req = request("Write a long story about a dragon who learns to cook.", 24);
    let (first, pieces) = generate(&decoder, &req);
    let (second, _) = generate(&decoder, &req);
    assert!(!first.text.trim().is_empty(), "empty reply");
    assert_eq!(first.text, second.text, "greedy decoding must repeat");
    assert_eq!(pieces.concat(), first.text, "the stream is the reply");
    assert!(pieces.len() > 1, "streamed in pieces: {pieces:?}");
    assert_eq!(first.completion_tokens, 24);
    assert_eq!(first.finish_reason, FinishReason::Length);
    assert!(first.prompt_tokens > 10, "{}", first.prompt_tokens);

    // A fresh decoder (new context) gives the same greedy text.
    let other = load(1024);
    assert_eq!(generate(&other, &req).0.text, first.text);
}

#[test]
fn a_shared_prefix_is_reused_and_changes_nothing() {
    let warm = load(1024);
    let first = request("Name three colours.", 12);
    let (g1, _) = generate(&warm, &first);
    assert_eq!(g1.cached_tokens, 0, "a fresh context has nothing to reuse");

    // The same conversation again: everything but the last prompt token.
    let (g2, _) = generate(&warm, &first);
    assert_eq!(g2.cached_tokens, g2.prompt_tokens - 1);
    assert_eq!(g2.text, g1.text);

    // Same system message, another question: only the shared head is
    // reused, and the reply is what a fresh context gives.
    let second = request("What is the capital of France?", 12);
    let (g3, _) = generate(&warm, &second);
    assert!(
        g3.cached_tokens > 5 && g3.cached_tokens < g3.prompt_tokens - 5,
        "{} of {}",
        g3.cached_tokens,
        g3.prompt_tokens
    );
    let (fresh, _) = generate(&load(1024), &second);
    assert_eq!(g3.text, fresh.text);
}

#[test]
fn a_short_answer_ends_on_the_end_of_generation_token() {
    let decoder = load(1024);
    let (g, _) = generate(&decoder, &request("Say just the word: yes", 200));
    assert_eq!(g.finish_reason, FinishReason::Stop, "{:?}", g.text);
    assert!(g.completion_tokens < 200);
    assert!(
        !g.text.contains("<|im_end|>"),
        "special tokens are not text: {:?}",
        g.text
    );
}

#[test]
fn stop_strings_stop_before_the_match() {
    let decoder = load(1024);
    let mut req = request("Count from 1 to 20, separated by commas.", 60);
    let (free, _) = generate(&decoder, &req);
    // Stop at a piece of text the free run produced after its start.
    let stop = free
        .text
        .match_indices(", 5")
        .next()
        .map(|(i, s)| (i, s.to_string()))
        .or_else(|| {
            let i = free.text.len() / 2;
            let i = (i..free.text.len())
                .find(|&i| free.text.is_char_boundary(i))
                .unwrap();
            let j = (i + 2..free.text.len())
                .find(|&j| free.text.is_char_boundary(j))
                .unwrap();
            Some((i, free.text[i..j].to_string()))
        })
        .unwrap();
    req.stop = vec![stop.1.clone()];
    let (stopped, pieces) = generate(&decoder, &req);
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, free.text[..free.text.find(&stop.1).unwrap()]);
    assert!(
        !pieces.concat().contains(&stop.1),
        "stop text never streams"
    );
}

#[test]
fn cancelling_ends_the_generation_and_the_decoder_goes_on() {
    let decoder = load(1024);
    let req = request("Write a long story about the sea.", 100);
    let g = decoder.generate(&req, &mut cancel_after(3)).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(g.completion_tokens < 10, "{}", g.completion_tokens);
    let (next, _) = generate(&decoder, &request("Say hello.", 8));
    assert!(!next.text.is_empty());
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let decoder = load(64);
    let long = "tell me about the weather ".repeat(40);
    let err = decoder
        .generate(
            &request(&long, 10),
            &mut |_: &str| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        matches!(err, DecoderError::ContextExceeded { context: 64, .. }),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("context length exceeded"),
        "{err}"
    );
    // The decoder still works after the refusal.
    let (g, _) = generate(&decoder, &request("Hi", 4));
    assert!(g.completion_tokens > 0);
}

#[test]
fn max_new_tokens_is_bounded_by_the_context() {
    let decoder = load(64);
    let req = GenerateRequest {
        ignore_eos: true,
        ..request("Write a long story.", 4096)
    };
    let (g, _) = generate(&decoder, &req);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.prompt_tokens + g.completion_tokens, 64);
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really a model").unwrap();
    let err = LlamaDecoder::load(&junk, &config(256))
        .err()
        .expect("junk must not load");
    assert!(matches!(err, DecoderError::ModelLoad { .. }), "{err}");
    assert!(err.to_string().contains("junk.gguf"), "{err}");

    // A truncated copy of the real model.
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(common::smollm2()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = LlamaDecoder::load(&truncated, &config(256))
        .err()
        .expect("a truncated model must not load");
    assert!(matches!(err, DecoderError::ModelLoad { .. }), "{err}");
}

/// Each prompt's greedy reply (max_new_tokens each) from a one-slot decoder,
/// one after another, and from a `parallel`-slot decoder, all at once.
fn single_and_batched(
    config: &DecoderConfig,
    parallel: usize,
    prompts: &[String],
    max_new_tokens: usize,
) -> (Vec<Generation>, Vec<Generation>) {
    let single = LlamaDecoder::load(&common::smollm2(), config).expect("load SmolLM2");
    let alone = prompts
        .iter()
        .map(|p| generate(&single, &request(p, max_new_tokens)).0)
        .collect();
    drop(single);
    let batched = LlamaDecoder::load(
        &common::smollm2(),
        &DecoderConfig {
            parallel,
            ..config.clone()
        },
    )
    .expect("load SmolLM2 with several slots");
    let together = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let batched = &batched;
                scope.spawn(move || generate(batched, &request(p, max_new_tokens)).0)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(batched.active_sequences(), Some(0));
    (alone, together)
}

fn texts(generations: Vec<Generation>) -> Vec<String> {
    generations.into_iter().map(|g| g.text).collect()
}

#[test]
fn concurrent_requests_are_batched_and_match_their_single_outputs() {
    let prompts = [
        "Write a poem about the sea.",
        "List three fruits.",
        "Explain what a CPU does.",
        "Say hello in French.",
        "Describe a cat in one sentence.",
    ]
    .map(String::from);
    // Three slots for five requests: two wait in the queue and join as
    // slots free up.
    let (alone, together) = single_and_batched(&config(512), 3, &prompts, 16);
    assert_eq!(
        texts(together),
        texts(alone),
        "greedy replies must not depend on batching"
    );
}

/// Where llama.cpp's CPU attention has batch-dependent fast paths: a
/// sequence bringing >= 64 prompt rows at once, and a lone sequence
/// decoding over >= 512 cells. Each of these long prompts is read in one
/// chunk alone but in other chunks beside the other, and decodes past 512
/// cells alone but beside the other when batched.
#[test]
fn long_prompts_stay_batch_invariant_past_the_fast_attention_paths() {
    let prompts = [
        format!(
            "Continue this list: {}",
            (1..=200)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "Summarise these notes: {}",
            (1..=40)
                .map(|i| format!("Note {i}: the tea was served at {i} past noon."))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ];
    for cache_type in [CacheType::Q8_0, CacheType::F16] {
        // Two threads: with one, the split-KV path has a single chunk.
        let config = DecoderConfig {
            threads: 2,
            cache_type,
            ..config(1024)
        };
        let (alone, together) = single_and_batched(&config, 2, &prompts, 24);
        for g in &alone {
            assert!(
                g.prompt_tokens > 512,
                "the prompt must pass 512 cells: {}",
                g.prompt_tokens
            );
        }
        assert_eq!(
            texts(together),
            texts(alone),
            "{cache_type:?}: greedy replies must not depend on batching"
        );
    }
}

#[test]
fn a_request_given_up_while_queued_never_starts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let decoder = load(512);
    let cancel = Arc::new(AtomicBool::new(false));
    let abandoned = GenerateRequest {
        cancel: Some(Arc::clone(&cancel)),
        control: None,
        ..request(&"word ".repeat(300), 4)
    };
    std::thread::scope(|scope| {
        // The one slot is busy with a long generation...
        let running = scope.spawn(|| {
            let long = GenerateRequest {
                ignore_eos: true,
                ..request("Count to one thousand.", 200)
            };
            generate(&decoder, &long).0
        });
        while decoder.active_sequences() != Some(1) {
            std::thread::yield_now();
        }
        // ...so this one queues, and its caller gives up before it starts.
        let waiting = scope.spawn(|| {
            decoder
                .generate(&abandoned, &mut |_: &str| ControlFlow::Continue(()))
                .unwrap()
        });
        cancel.store(true, Ordering::Relaxed);
        let given_up = waiting.join().unwrap();
        assert_eq!(given_up.finish_reason, FinishReason::Cancelled);
        assert_eq!(given_up.prompt_tokens, 0, "its prompt was never read");
        assert_eq!(running.join().unwrap().completion_tokens, 200);
    });
}

#[test]
fn shutdown_ends_running_and_queued_jobs_and_refuses_new_ones() {
    // One slot: the second request waits in the worker's queue.
    let decoder = load(1024);
    let mut long = request("Count from one to one thousand.", 3000);
    long.ignore_eos = true;
    let (first_piece, got_piece) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            let mut sink = |_: &str| {
                let _ = first_piece.send(());
                ControlFlow::Continue(())
            };
            decoder.generate(&long, &mut sink)
        });
        got_piece
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the long generation streams (a hang guard)");
        let queued = scope.spawn(|| {
            decoder.generate(&request("Hi", 4), &mut |_: &str| ControlFlow::Continue(()))
        });
        // Let the second job reach the worker's queue (a sequence is busy).
        std::thread::sleep(std::time::Duration::from_millis(200));
        decoder
            .shutdown(std::time::Duration::from_secs(20))
            .expect("the worker stops within the bound");
        for job in [running, queued] {
            let err = job.join().unwrap().unwrap_err();
            assert!(matches!(err, DecoderError::ShuttingDown), "{err}");
        }
    });
    assert!(decoder.health().is_ok(), "a shutdown is not a death");
    let err = decoder
        .generate(&request("Hi", 4), &mut |_: &str| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(matches!(err, DecoderError::ShuttingDown), "{err}");
}
