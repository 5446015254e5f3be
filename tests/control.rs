//! Per-request control vectors on the real SmolLM2-135M GGUF: a zero vector
//! changes nothing (bit for bit), a large one changes the scores, clearing
//! restores them, the prompt cache never mixes cells of two vectors, and
//! steered requests beside plain ones leave every greedy reply as it is
//! alone.

mod common;

use tofy::decoder::llama::LlamaDecoder;
use tofy::decoder::stub::StubDecoder;
use tofy::decoder::{
    ChatMessage, ControlVector, Decoder, DecoderConfig, DecoderError, GenerateRequest, Prompt,
    Role, Sampling, Score, ScoreRequest,
};

use common::generate_collecting as generate;

fn load(parallel: usize) -> LlamaDecoder {
    let config = DecoderConfig {
        ctx: 512,
        ngl: 0,
        threads: 1,
        parallel,
        ..DecoderConfig::default()
    };
    LlamaDecoder::load(&common::smollm2(), &config).expect("load SmolLM2")
}

/// A fixed direction of norm about 17 (no token or model structure in it),
/// times `strength`, at layers 10..=20.
fn steer(decoder: &LlamaDecoder, strength: f32, phase: f32) -> ControlVector {
    let (n_embd, _) = decoder.control_shape().unwrap();
    let direction: Vec<f32> = (0..n_embd)
        .map(|i| (i as f32 * 0.37 + phase).sin())
        .collect();
    ControlVector::uniform(&direction, strength, 10..=20).unwrap()
}

fn prompt() -> Prompt {
    Prompt::chat(vec![ChatMessage::new(
        Role::User,
        "What is the capital of France?",
    )])
}

fn score(decoder: &LlamaDecoder, control: Option<&ControlVector>) -> Score {
    decoder
        .score(&ScoreRequest {
            prompt: prompt(),
            continuation: "The capital of France is Paris.<|im_end|>".into(),
            cancel: None,
            control: control.cloned(),
        })
        .unwrap()
}

fn max_diff(a: &Score, b: &Score) -> f64 {
    a.logprobs
        .iter()
        .zip(&b.logprobs)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn zero_changes_nothing_large_changes_scores_and_clearing_restores() {
    let decoder = load(1);
    let (n_embd, n_layer) = decoder.control_shape().unwrap();
    assert_eq!((n_embd, n_layer), (576, 30));
    let plain = score(&decoder, None);

    let zero =
        ControlVector::new(vec![0.0; n_embd * (n_layer - 1)], n_embd, 1..=n_layer - 1).unwrap();
    let zeroed = score(&decoder, Some(&zero));
    assert_eq!(
        zeroed.logprobs, plain.logprobs,
        "a zero vector is bit-exact"
    );
    assert_eq!(zeroed.cached_tokens, 0, "cells of no vector are not reused");

    let large = steer(&decoder, 2.0, 0.0);
    let steered = score(&decoder, Some(&large));
    assert_eq!(
        steered.cached_tokens, 0,
        "cells of another vector are not reused"
    );
    let d = max_diff(&steered, &plain);
    assert!(d > 0.5, "a large vector changes the scores (max diff {d})");

    // Clearing restores the scores bit for bit, and nothing written under
    // the vector is taken from the cache.
    let cleared = score(&decoder, None);
    assert_eq!(cleared.cached_tokens, 0);
    assert_eq!(cleared.logprobs, plain.logprobs);

    // The same vector again (equal values, another allocation) reuses
    // its own cells (all but the last prompt item, whose logits are
    // needed) and scores the same.
    let first = score(&decoder, Some(&large));
    let again = score(&decoder, Some(&steer(&decoder, 2.0, 0.0)));
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    assert!(
        max_diff(&again, &first) <= 1e-4,
        "{}",
        max_diff(&again, &first)
    );
}

fn chat(i: usize, control: Option<ControlVector>) -> GenerateRequest {
    GenerateRequest {
        control,
        ..GenerateRequest::chat(
            vec![ChatMessage::new(
                Role::User,
                format!("Give me one fact about the number {i}."),
            )],
            12,
            Sampling::greedy(),
        )
    }
}

#[test]
fn steered_requests_beside_plain_ones_keep_every_greedy_reply() {
    let alone = load(1);
    let (a, b) = (steer(&alone, 1.5, 0.0), steer(&alone, 1.5, 1.0));
    let requests = [
        chat(0, None),
        chat(1, Some(a.clone())),
        chat(2, None),
        chat(3, Some(b)),
        chat(4, Some(a)),
        chat(5, None),
    ];
    let solo: Vec<String> = requests
        .iter()
        .map(|r| generate(&alone, r).0.text)
        .collect();
    // The vector steers generation too: request 1 differs from its plain twin.
    let unsteered = generate(&alone, &chat(1, None)).0.text;
    assert_ne!(solo[1], unsteered, "the vector changes the greedy reply");

    let batched = load(6);
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| generate(&batched, r).0.text))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, solo);
}

#[test]
fn a_vector_that_does_not_fit_the_model_is_one_clear_error() {
    let decoder = load(1);
    let narrow = ControlVector::uniform(&[0.1; 575], 1.0, 1..=2).unwrap();
    let err = decoder
        .score(&ScoreRequest {
            prompt: prompt(),
            continuation: "Paris".into(),
            cancel: None,
            control: Some(narrow),
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the control vector is 575 wide but this model's hidden size (n_embd) is 576"
    );
    let deep = ControlVector::uniform(&[0.1; 576], 1.0, 25..=30).unwrap();
    let err = decoder
        .generate(&chat(0, Some(deep)), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the control vector reaches layer 30 but this model's last layer that takes one is 29"
    );
    // The decoder still serves.
    assert!(!generate(&decoder, &chat(0, None)).0.text.is_empty());

    let stub = StubDecoder;
    let err = stub
        .generate(&chat(0, Some(steer(&decoder, 1.0, 0.0))), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(matches!(err, DecoderError::Unsupported { .. }), "{err}");
}

#[test]
fn the_residual_reader_averages_over_its_layers_and_span() {
    let decoder = load(1);
    let mut tokens = decoder.prompt_tokens(&prompt()).unwrap();
    let from = tokens.len();
    tokens.extend(
        decoder
            .tokenize("The capital of France is Paris.<|im_end|>", false)
            .unwrap(),
    );
    let tokens: Vec<_> = tokens
        .into_iter()
        .map(llama_cpp_2::token::LlamaToken)
        .collect();
    let mean = |layers: std::ops::RangeInclusive<usize>, from: usize| {
        decoder
            .residual_reader(layers, 128, 1, 1)
            .unwrap()
            .span_mean(&tokens, from)
            .unwrap()
    };
    let (ten, eleven, both) = (
        mean(10..=10, from),
        mean(11..=11, from),
        mean(10..=11, from),
    );
    assert_eq!(both.len(), 576);
    let scale = both.iter().map(|v| v.abs()).fold(0.0, f32::max);
    for ((a, b), m) in ten.iter().zip(&eleven).zip(&both) {
        assert!(((a + b) / 2.0 - m).abs() <= 1e-4 * scale, "{a} {b} {m}");
    }
    assert_ne!(
        mean(10..=10, 0),
        ten,
        "the span is the reply's, not the whole prompt"
    );

    // The same reader twice gives the same means (its state is reset).
    let mut reader = decoder.residual_reader(10..=10, 256, 4, 1).unwrap();
    assert_eq!(reader.span_mean(&tokens, from).unwrap(), ten);
    assert_eq!(reader.span_mean(&tokens, from).unwrap(), ten);

    let err = decoder.residual_reader(20..=29, 128, 1, 1).err().unwrap();
    assert!(err.to_string().contains("only keeps output rows"), "{err}");
    // Several prompts in one pass, a sequence each: each its own mean.
    let head = &tokens[..from + 2];
    let apart = reader.span_mean(head, from).unwrap();
    let together = reader
        .span_means(&[(&tokens, from), (head, from), (&tokens, from)])
        .unwrap();
    for (got, want) in together.iter().zip([&ten, &apart, &ten]) {
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // Another batch shape takes other GEMM kernels: about 0.3% here.
        assert!(d <= 1e-2 * scale, "a pass of three vs alone: {d}");
    }
    let d = together[1]
        .iter()
        .zip(&ten)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d > 0.1 * scale, "the spans are told apart: {d}");
    let err = reader.span_mean(&vec![tokens[0]; 300], 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the prompts are 300 tokens in all; at most 256 fit one pass"
    );
}
