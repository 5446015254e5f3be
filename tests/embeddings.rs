//! The prefix-embedding hook on the real SmolLM2-135M GGUF: token rows read
//! from the GGUF reproduce the token path (logits and greedy text), split
//! across decodes, mixed in one batch with another sequence's tokens, and
//! through the split fallback; embedding prompts beside plain ones in the
//! scheduler; the prompt cache over rows; teacher-forced scoring.

mod common;

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use tofy::decoder::llama::ffi::{Evaluator, TokenEmbeddings};
use tofy::decoder::llama::{LlamaDecoder, backend};
use tofy::decoder::{
    ChatMessage, Decoder, DecoderConfig, DecoderError, EMBEDDINGS_MARKER, Embeddings,
    GenerateRequest, Prompt, Role, Sampling, ScoreRequest, Segment,
};

use common::generate_collecting as generate;

const TEXT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
const OTHER: &str = "The quick brown fox jumps over the lazy dog because";

fn config(parallel: usize) -> DecoderConfig {
    DecoderConfig {
        ctx: 512,
        ngl: 0,
        threads: 1,
        parallel,
        ..DecoderConfig::default()
    }
}

fn load(parallel: usize) -> LlamaDecoder {
    LlamaDecoder::load(&common::smollm2(), &config(parallel)).expect("load SmolLM2")
}

fn table() -> TokenEmbeddings {
    TokenEmbeddings::open(&common::smollm2()).expect("read the token embeddings")
}

/// The rows of `tokens`, as the prompt would see them.
fn rows_of(table: &TokenEmbeddings, tokens: &[i32]) -> Embeddings {
    Embeddings::new(table.rows(tokens).unwrap(), table.width()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Feeds `seq` its `parts` in order (each part its own `llama_process`
/// call), and returns the last row's logits. A part is tokens or rows.
enum Part<'a> {
    Tokens(&'a [i32]),
    Rows(&'a Embeddings),
}

fn feed(eval: &mut Evaluator<'_>, seq: i32, parts: &[Part<'_>]) -> Vec<f32> {
    let mut pos = 0;
    let mut last = -1;
    for (p, part) in parts.iter().enumerate() {
        eval.clear();
        let final_part = p + 1 == parts.len();
        match part {
            Part::Tokens(tokens) => {
                for (i, &t) in tokens.iter().enumerate() {
                    let out = final_part && i + 1 == tokens.len();
                    last = eval.add_token(LlamaToken(t), pos, seq, out).unwrap();
                    pos += 1;
                }
            }
            Part::Rows(rows) => {
                for r in 0..rows.n_rows() {
                    let out = final_part && r + 1 == rows.n_rows();
                    last = eval.add_row(rows.row(r), pos, seq, out).unwrap();
                    pos += 1;
                }
            }
        }
        eval.process().unwrap();
    }
    eval.logits(last).to_vec()
}

#[test]
fn token_rows_from_the_gguf_give_the_token_paths_logits() {
    let backend = backend().unwrap();
    let model =
        LlamaModel::load_from_file(backend, common::smollm2(), &LlamaModelParams::default())
            .unwrap();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(1024))
        .with_n_seq_max(2)
        .with_n_threads(1)
        .with_n_threads_batch(1);
    let mut eval = Evaluator::new(model.new_context(backend, params).unwrap());
    let table = table();
    assert_eq!(
        table.width(),
        tofy::decoder::llama::ffi::input_width(&model)
    );
    let tokenize = |text: &str| -> Vec<i32> {
        model
            .vocab()
            .tokenize(text.as_bytes(), false, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    };
    let tokens = tokenize(TEXT);
    let other = tokenize(OTHER);
    let rows = rows_of(&table, &tokens);
    let reset = |eval: &mut Evaluator<'_>| eval.clear_all();

    let by_tokens = feed(&mut eval, 0, &[Part::Tokens(&tokens)]);
    reset(&mut eval);
    let by_rows = feed(&mut eval, 0, &[Part::Rows(&rows)]);
    let d = max_abs_diff(&by_tokens, &by_rows);
    eprintln!("rows vs tokens: max |logit difference| {d}");
    assert!(d <= 1e-4, "rows vs tokens: max |diff| {d}");

    // Half rows in one decode, then half tokens in the next.
    reset(&mut eval);
    let half = tokens.len() / 2;
    let head = rows_of(&table, &tokens[..half]);
    let split = feed(
        &mut eval,
        0,
        &[Part::Rows(&head), Part::Tokens(&tokens[half..])],
    );
    let d = max_abs_diff(&by_tokens, &split);
    assert!(d <= 1e-4, "split rows/tokens: max |diff| {d}");

    // One mixed batch: sequence 0 as rows, sequence 1 as tokens of
    // another text; each gets the logits it gets alone.
    reset(&mut eval);
    let other_alone = feed(&mut eval, 1, &[Part::Tokens(&other)]);
    reset(&mut eval);
    eval.clear();
    let mut at0 = -1;
    for r in 0..rows.n_rows() {
        let last = r + 1 == rows.n_rows();
        at0 = eval.add_row(rows.row(r), r as i32, 0, last).unwrap();
    }
    let mut at1 = -1;
    for (i, &t) in other.iter().enumerate() {
        let last = i + 1 == other.len();
        at1 = eval.add_token(LlamaToken(t), i as i32, 1, last).unwrap();
    }
    eval.process().unwrap();
    let d0 = max_abs_diff(&by_tokens, eval.logits(at0));
    let d1 = max_abs_diff(&other_alone, eval.logits(at1));
    assert!(d0 <= 1e-4 && d1 <= 1e-4, "mixed batch: {d0} / {d1}");

    // A row of the wrong width is refused by llama.cpp, not read past.
    eval.clear();
    assert!(eval.add_row(&[0.0; 8], 0, 0, false).is_err());
}

#[test]
fn rows_give_the_same_greedy_reply_and_score_as_tokens() {
    let decoder = load(1);
    let table = table();
    let tokens = decoder.tokenize(TEXT, false).unwrap();
    let rows = rows_of(&table, &tokens);
    let half = tokens.len() / 2;
    let prompts = [
        Prompt::Raw(vec![Segment::Tokens(tokens.clone())]),
        Prompt::Raw(vec![Segment::Embeddings(rows)]),
        Prompt::Raw(vec![
            Segment::Embeddings(rows_of(&table, &tokens[..half])),
            Segment::Tokens(tokens[half..].to_vec()),
        ]),
    ];
    let replies: Vec<_> = prompts
        .iter()
        .map(|p| {
            let request = GenerateRequest {
                prompt: p.clone(),
                ..GenerateRequest::chat(Vec::new(), 16, Sampling::greedy())
            };
            generate(&decoder, &request).0
        })
        .collect();
    assert!(replies[0].text.contains("Paris"), "{}", replies[0].text);
    for r in &replies[1..] {
        assert_eq!(r.text, replies[0].text);
        assert_eq!(r.prompt_tokens, tokens.len(), "rows count as prompt tokens");
    }

    // Scoring the greedy reply: every token is the argmax, so each
    // log-probability is the largest of its row, and none is positive.
    let continuation = format!("{}<|im_end|>", replies[0].text);
    let scores: Vec<_> = prompts
        .iter()
        .map(|p| {
            decoder
                .score(&ScoreRequest {
                    prompt: p.clone(),
                    continuation: continuation.clone(),
                    cancel: None,
                    control: None,
                })
                .unwrap()
        })
        .collect();
    let first = &scores[0];
    assert_eq!(first.prompt_tokens, tokens.len());
    assert_eq!(
        first.tokens.last(),
        decoder.tokenize("<|im_end|>", false).unwrap().last(),
        "the end-of-turn token is scored"
    );
    assert!(first.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
    assert!(
        first.mean_nll() < 1.0,
        "greedy text is likely: {}",
        first.mean_nll()
    );
    for s in &scores[1..] {
        assert_eq!(s.tokens, first.tokens);
        let d = s
            .logprobs
            .iter()
            .zip(&first.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d <= 1e-4, "scores differ by {d}");
    }

    // Scoring the last prompt again reuses its cells (rows included) and
    // gives the same numbers. (A token's cell never stands for its row, or
    // the other way round: the bits differ from what the cell was fed.)
    let again = decoder
        .score(&ScoreRequest {
            prompt: prompts[2].clone(),
            continuation,
            cancel: None,
            control: None,
        })
        .unwrap();
    assert_eq!(
        again.cached_tokens,
        tokens.len() - 1,
        "the prompt is reused"
    );
    assert_eq!(again.logprobs, scores[2].logprobs);

    // Nothing to score is a clear error.
    let empty = decoder.score(&ScoreRequest {
        prompt: prompts[0].clone(),
        continuation: String::new(),
        cancel: None,
        control: None,
    });
    assert!(matches!(empty, Err(DecoderError::EmptyContinuation)));
}

#[test]
fn the_split_fallback_gives_the_same_replies() {
    let mixed = load(2);
    let split = LlamaDecoder::load(
        &common::smollm2(),
        &DecoderConfig {
            split_mixed_batches: true,
            ..config(2)
        },
    )
    .unwrap();
    // SmolLM2 (llama) mixes; the config forces the fallback.
    assert!(!mixed.splits_mixed_batches());
    assert!(split.splits_mixed_batches());
    let table = table();
    let tokens = mixed.tokenize(TEXT, false).unwrap();
    let half = tokens.len() / 2;
    let request = GenerateRequest {
        prompt: Prompt::Raw(vec![
            Segment::Tokens(tokens[..half].to_vec()),
            Segment::Embeddings(rows_of(&table, &tokens[half..])),
        ]),
        ..GenerateRequest::chat(Vec::new(), 12, Sampling::greedy())
    };
    let plain = GenerateRequest {
        prompt: Prompt::text(OTHER),
        ..GenerateRequest::chat(Vec::new(), 12, Sampling::greedy())
    };
    for decoder in [&mixed, &split] {
        let both = std::thread::scope(|s| {
            let a = s.spawn(|| generate(decoder, &request).0.text);
            let b = s.spawn(|| generate(decoder, &plain).0.text);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(both.0, generate(&mixed, &request).0.text);
        assert_eq!(both.1, generate(&mixed, &plain).0.text);
    }
}

/// The chat conversation of request `i`: a system prompt with the rows at
/// the marker for odd `i` (prefix requests), plain for even ones.
fn chat_request(i: usize, rows: &Embeddings) -> GenerateRequest {
    let question = format!("Give me one fact about the number {i}.");
    let prompt = if i == 3 {
        Prompt::Chat {
            messages: vec![
                ChatMessage::new(Role::System, format!("You are terse. {EMBEDDINGS_MARKER}")),
                ChatMessage::new(Role::User, question),
            ],
            embeddings: vec![rows.clone()],
        }
    } else {
        Prompt::chat(vec![
            ChatMessage::new(Role::System, "You are terse."),
            ChatMessage::new(Role::User, question),
        ])
    };
    GenerateRequest {
        prompt,
        ..GenerateRequest::chat(Vec::new(), 12, Sampling::greedy())
    }
}

#[test]
fn a_prefix_request_among_seven_plain_ones_changes_no_reply() {
    let table = table();
    let alone = load(1);
    // Soft rows: the rows of a text, scaled, so they are no token's row.
    let tokens = alone.tokenize("Answer like a pirate.", false).unwrap();
    let mut data = table.rows(&tokens).unwrap();
    data.iter_mut().for_each(|v| *v *= 0.8);
    let rows = Embeddings::new(data, table.width()).unwrap();
    let requests: Vec<_> = (0..8).map(|i| chat_request(i, &rows)).collect();
    let solo: Vec<String> = requests
        .iter()
        .map(|r| generate(&alone, r).0.text)
        .collect();

    let batched = load(8);
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| generate(&batched, r).0.text))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, solo);

    // The same prefix request again reuses its cells, rows included; a
    // prefix of the same length with other values is never taken from the
    // cache past the rows' start.
    let (first, _) = generate(&alone, &requests[3]);
    let (again, _) = generate(&alone, &requests[3]);
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    assert_eq!(again.text, first.text);
    let mut other = table.rows(&tokens).unwrap();
    other.iter_mut().for_each(|v| *v *= 0.7);
    let other_rows = Embeddings::new(other, table.width()).unwrap();
    let (changed, _) = generate(&alone, &chat_request(3, &other_rows));
    let marker_at = {
        let head = alone
            .tokenize("<|im_start|>system\nYou are terse. ", true)
            .unwrap();
        head.len()
    };
    assert!(
        changed.cached_tokens <= marker_at,
        "{} cached, the rows start at {marker_at}",
        changed.cached_tokens
    );
    assert!(
        changed.cached_tokens > 0,
        "the head before the rows is reused"
    );
}

#[test]
fn bad_embedding_prompts_are_clear_errors() {
    let decoder = load(1);
    let wrong_width = Embeddings::new(vec![0.5; 8], 4).unwrap();
    let request = |prompt| GenerateRequest {
        prompt,
        ..GenerateRequest::chat(Vec::new(), 4, Sampling::greedy())
    };
    let err = decoder
        .generate(
            &request(Prompt::Raw(vec![Segment::Embeddings(wrong_width.clone())])),
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("input width (n_embd) is 576"),
        "{err}"
    );
    // A marker the conversation's rows do not account for.
    let err = decoder
        .generate(
            &request(Prompt::Chat {
                messages: vec![ChatMessage::new(
                    Role::User,
                    format!("{EMBEDDINGS_MARKER} and {EMBEDDINGS_MARKER}"),
                )],
                embeddings: vec![Embeddings::new(vec![0.0; 576], 576).unwrap()],
            }),
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecoderError::Markers {
                markers: 2,
                sets: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = decoder
        .generate(
            &request(Prompt::Raw(vec![Segment::Tokens(vec![1, 999_999])])),
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        matches!(err, DecoderError::InvalidToken { token: 999_999, .. }),
        "{err}"
    );
    assert_eq!(
        decoder
            .detokenize(&decoder.tokenize("Hello, world!", false).unwrap())
            .unwrap(),
        "Hello, world!"
    );
}

#[test]
fn layout_shows_the_prompt_as_the_model_reads_it() {
    let decoder = load(1);
    let table = table();
    let rows = rows_of(&table, &decoder.tokenize("two rows", false).unwrap());
    assert_eq!(rows.n_rows(), 2);
    let prompt = Prompt::Chat {
        messages: vec![
            ChatMessage::new(Role::System, format!("Steer: {EMBEDDINGS_MARKER}")),
            ChatMessage::new(Role::User, "hello"),
        ],
        embeddings: vec![rows.clone()],
    };
    let segments = decoder.layout(&prompt).unwrap();
    let [
        Segment::Tokens(before),
        Segment::Embeddings(got),
        Segment::Tokens(after),
    ] = segments.as_slice()
    else {
        panic!("{segments:?}")
    };
    assert_eq!(*got, rows);
    // The tokens are the template's text around the marker, BOS first.
    let text = decoder.detokenize(before).unwrap()
        + EMBEDDINGS_MARKER
        + &decoder.detokenize(after).unwrap();
    assert!(text.contains("Steer: <tofy:embeddings>"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    // Plain text is one run of tokens; a marker typed into a message, one
    // more than the sets of rows, is refused as generate refuses it.
    let plain = decoder.layout(&Prompt::text("hello there")).unwrap();
    assert!(matches!(plain.as_slice(), [Segment::Tokens(t)] if t.len() >= 2));
    // prompt_tokens is that run, and refuses a prompt with rows.
    let Segment::Tokens(run) = &plain[0] else {
        unreachable!()
    };
    assert_eq!(
        decoder.prompt_tokens(&Prompt::text("hello there")).unwrap(),
        *run
    );
    assert!(matches!(
        decoder.prompt_tokens(&prompt),
        Err(DecoderError::Unsupported { .. })
    ));
    let stray = Prompt::Chat {
        messages: vec![
            ChatMessage::new(Role::System, EMBEDDINGS_MARKER),
            ChatMessage::new(Role::User, EMBEDDINGS_MARKER),
        ],
        embeddings: vec![rows],
    };
    assert!(matches!(
        decoder.layout(&stray),
        Err(DecoderError::Markers {
            markers: 2,
            sets: 1,
            ..
        })
    ));
}
