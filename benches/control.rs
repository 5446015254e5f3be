//! What a per-request control vector costs (issue 13): llama.cpp holds one
//! vector per context and re-reserves its graph whenever it changes, so the
//! scheduler evaluates each vector's rows in their own call and switches
//! between them.
//!
//! 1. Raw, on one sequence through `Evaluator`: the time of a one-token
//!    decode step with no vector, with one vector held, and with the vector
//!    switched before every step (A↔B, and none↔A as plain and steered
//!    requests alternate).
//! 2. Through the scheduler: two concurrent greedy streams (parallel 2),
//!    plain+plain, A+A (one call per step), plain+A and A+B (two calls and
//!    one switch per step), aggregate tokens/s.
//!
//! Environment: TOFY_BENCH_GGUF (default: models/SmolLM2-135M-Instruct.Q4_1.gguf),
//! TOFY_BENCH_THREADS (default: physical cores), TOFY_BENCH_NG (decode steps, default 64).

use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use tofy::decoder::llama::ffi::Evaluator;
use tofy::decoder::llama::{LlamaDecoder, backend};
use tofy::decoder::{
    ChatMessage, ControlVector, Decoder, DecoderConfig, GenerateRequest, Role, Sampling, config,
};

const REPS: usize = 3;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
    })
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// A fixed direction times `strength` at layers 10..=20.
fn vector(n_embd: usize, strength: f32, phase: f32) -> ControlVector {
    let direction: Vec<f32> = (0..n_embd)
        .map(|i| (i as f32 * 0.37 + phase).sin())
        .collect();
    ControlVector::uniform(&direction, strength, 10..=20).expect("a valid vector")
}

fn main() {
    let gguf = std::env::var_os("TOFY_BENCH_GGUF").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    let threads = env_usize("TOFY_BENCH_THREADS", config::physical_cores());
    let ng = env_usize("TOFY_BENCH_NG", 64);
    println!(
        "# control vectors: {} threads={threads}, {ng} decode steps, median of {REPS}",
        gguf.display()
    );
    raw_switch_cost(&gguf, threads, ng);
    scheduler_streams(&gguf, threads, ng);
}

fn raw_switch_cost(gguf: &Path, threads: usize, ng: usize) {
    let backend = backend().expect("llama.cpp backend");
    let model = LlamaModel::load_from_file(backend, gguf, &LlamaModelParams::default())
        .expect("load the GGUF");
    let (n_embd, n_layer) = (model.n_embd() as usize, model.n_layer() as usize);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(512))
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32);
    let mut eval = Evaluator::new(model.new_context(backend, params).expect("a context"));
    let prompt: Vec<LlamaToken> =
        model
            .vocab()
            .tokenize(b"The history of the city begins with", true, true);
    eval.clear();
    for (i, &t) in prompt.iter().enumerate() {
        eval.add_token(t, i as i32, 0, i + 1 == prompt.len())
            .unwrap();
    }
    eval.process().unwrap();
    let (a, b) = (vector(n_embd, 1.0, 0.0), vector(n_embd, 1.0, 1.0));
    // Each case: the vector to set before step `i` (None: leave it).
    type Case<'a> = (
        &'a str,
        Box<dyn Fn(usize) -> Option<Option<&'a ControlVector>> + 'a>,
    );
    let cases: Vec<Case<'_>> = vec![
        ("no vector", Box::new(|_| None)),
        (
            "one vector held",
            Box::new(|i| (i == 0).then_some(Some(&a))),
        ),
        (
            "switch A<->B every step",
            Box::new(|i| Some(Some(if i % 2 == 0 { &a } else { &b }))),
        ),
        (
            "switch none<->A every step",
            Box::new(|i| Some((i % 2 == 1).then_some(&a))),
        ),
    ];
    for (name, set) in &cases {
        let mut steps = Vec::new();
        for _ in 0..REPS {
            eval.set_control(None, n_layer).unwrap();
            eval.clear_seq(0, Some(prompt.len() as u32));
            // One warm-up step per rep: the first evaluation after a change
            // of graph shape is not what is measured.
            let mut times = Vec::with_capacity(ng);
            for i in 0..=ng {
                let start = Instant::now();
                if let Some(control) = set(i) {
                    eval.set_control(control, n_layer).unwrap();
                }
                eval.clear();
                eval.add_token(
                    LlamaToken(100 + i as i32),
                    (prompt.len() + i) as i32,
                    0,
                    true,
                )
                .unwrap();
                eval.process().unwrap();
                if i > 0 {
                    times.push(start.elapsed());
                }
            }
            steps.push(median(times));
        }
        let step = median(steps);
        println!(
            "raw | {name:<28} | {:>7.3} ms per one-token step",
            step.as_secs_f64() * 1e3
        );
    }
}

fn scheduler_streams(gguf: &Path, threads: usize, ng: usize) {
    let cfg = DecoderConfig {
        ctx: 256,
        threads,
        parallel: 2,
        ngl: 0,
        ..DecoderConfig::default()
    };
    let decoder = LlamaDecoder::load(gguf, &cfg).expect("load the GGUF");
    let (n_embd, _) = decoder.control_shape().unwrap();
    let (a, b) = (vector(n_embd, 1.0, 0.0), vector(n_embd, 1.0, 1.0));
    let request = |i: usize, control: Option<&ControlVector>| GenerateRequest {
        ignore_eos: true,
        control: control.cloned(),
        ..GenerateRequest::chat(
            vec![ChatMessage::new(
                Role::User,
                format!("Tell me about the number {i}."),
            )],
            ng,
            Sampling::greedy(),
        )
    };
    let cases: [(&str, &[Option<&ControlVector>]); 6] = [
        ("plain alone", &[None]),
        ("A alone", &[Some(&a)]),
        ("plain + plain", &[None, None]),
        ("A + A (one call per step)", &[Some(&a), Some(&a)]),
        ("plain + A (two calls, one switch)", &[None, Some(&a)]),
        ("A + B (two calls, one switch)", &[Some(&a), Some(&b)]),
    ];
    for (name, controls) in cases {
        let mut rates = Vec::new();
        for rep in 0..REPS {
            let start = Instant::now();
            let tokens: usize = std::thread::scope(|s| {
                let handles: Vec<_> = controls
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        let r = request(rep * 2 + k, *c);
                        let decoder = &decoder;
                        s.spawn(move || {
                            decoder
                                .generate(&r, &mut |_| ControlFlow::Continue(()))
                                .expect("generate")
                                .completion_tokens
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            rates.push(Duration::from_secs_f64(
                start.elapsed().as_secs_f64() / tokens as f64,
            ));
        }
        let per_token = median(rates);
        println!(
            "scheduler | {name:<34} | {:>7.1} tok/s aggregate",
            1.0 / per_token.as_secs_f64()
        );
    }
}
