//! Decoder throughput and time to first token, printed in the same form as
//! llama.cpp's `tgbench` peer so scripts/bench-decoder.sh can set them side
//! by side (not criterion: one generation is seconds long, and the peers
//! report three repetitions each).
//!
//! Environment: TOFY_BENCH_GGUF (default: models/SmolLM2-135M-Instruct.Q4_1.gguf),
//! TOFY_BENCH_THREADS (default: physical cores), TOFY_BENCH_NP / TOFY_BENCH_NG
//! (prefill and decode tokens, default 128 / 128), TOFY_BENCH_NGL (default 0),
//! TOFY_BENCH_SUBPROCESS_BIN (a llama-completion to time the subprocess
//! backend's first token against; skipped when unset).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use tofy::decoder::llama::LlamaDecoder;
use tofy::decoder::subprocess::SubprocessDecoder;
use tofy::decoder::{
    ChatMessage, Decoder, DecoderConfig, GenerateRequest, Prompt, Role, Sampling, config,
};

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
        })
        .unwrap_or(default)
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let gguf = std::env::var_os("TOFY_BENCH_GGUF").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    let threads = env_usize("TOFY_BENCH_THREADS", config::physical_cores());
    let (np, ng) = (
        env_usize("TOFY_BENCH_NP", 128),
        env_usize("TOFY_BENCH_NG", 128),
    );
    let ngl = env_usize("TOFY_BENCH_NGL", 0) as u32;
    let cfg = DecoderConfig {
        ctx: (np + ng + 16) as u32,
        ngl,
        threads,
        ..DecoderConfig::default()
    };
    let decoder = LlamaDecoder::load(&gguf, &cfg).expect("load the GGUF");

    // A text prompt of about np tokens (the exact count is printed). Each
    // repetition starts on another word, so nothing of the previous prompt
    // can be reused from the context: this measures prefill, not the cache.
    let words = [
        "tell", "me", "about", "the", "weather", "in", "spring", "today",
    ];
    for rep in 0..3 {
        let text: String = (0..np)
            .map(|i| words[(i + rep) % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        let request = GenerateRequest {
            prompt: Prompt::text(text),
            max_new_tokens: ng,
            sampling: Sampling {
                repeat_penalty: 1.0,
                ..Sampling::greedy()
            },
            stop: Vec::new(),
            ignore_eos: true,
            cancel: None,
            control: None,
        };
        let g = decoder
            .generate(&request, &mut |_| ControlFlow::Continue(()))
            .expect("generate");
        let prompt = g.prompt_time.expect("the llama backend times the prompt");
        let decode = g.total_time - g.time_to_first_token;
        let evaluated = g.prompt_tokens - g.cached_tokens;
        println!(
            "tofy threads={threads} ngl={ngl} prefill {evaluated} tok {:.1} tok/s | decode {} tok {:.1} tok/s",
            evaluated as f64 / prompt.as_secs_f64(),
            g.completion_tokens,
            (g.completion_tokens - 1) as f64 / decode.as_secs_f64(),
        );
    }

    // Time to first token on short chat prompts, the model already loaded:
    // the same system message, a different question each time (so only the
    // system head can come from the previous request's context).
    let questions = [
        "write a short gpu recommendation",
        "suggest a laptop for travel",
        "how do I keep basil alive",
        "name a good first programming language",
        "what should I cook tonight",
    ];
    let chat = |question: &str| {
        GenerateRequest::chat(
            vec![
                ChatMessage::new(Role::System, "You are a helpful assistant."),
                ChatMessage::new(Role::User, question),
            ],
            8,
            Sampling::greedy(),
        )
    };
    let ttft = |d: &dyn Decoder, reps: usize| {
        median(
            questions[..reps]
                .iter()
                .map(|q| {
                    d.generate(&chat(q), &mut |_| ControlFlow::Break(()))
                        .expect("generate")
                        .time_to_first_token
                })
                .collect(),
        )
    };
    let in_process = ttft(&decoder, 5);
    println!(
        "tofy ttft in-process {:.1} ms (median of 5 questions, shared system message reused)",
        in_process.as_secs_f64() * 1e3
    );
    if let Some(bin) = std::env::var_os("TOFY_BENCH_SUBPROCESS_BIN") {
        let sub_cfg = DecoderConfig {
            bin: bin.to_string_lossy().into_owned(),
            ..cfg
        };
        let mut sub = SubprocessDecoder::new(gguf.clone(), &sub_cfg);
        let subprocess = ttft(&mut sub, 3);
        println!(
            "tofy ttft subprocess {:.1} ms (median of 3 questions) | in-process is {:.1}x lower",
            subprocess.as_secs_f64() * 1e3,
            subprocess.as_secs_f64() / in_process.as_secs_f64()
        );
    }
}
