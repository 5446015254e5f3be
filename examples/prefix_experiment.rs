//! One embedding-prefix experiment, end to end through tofy's public API:
//! load the GGUF, read token embeddings from it, build a soft prefix, let
//! the model generate after it, and score a continuation under each prefix.
//!
//! ```sh
//! cargo run --release --example prefix_experiment [GGUF]
//! ```
//!
//! The soft prefix starts as the embedding rows of an instruction ("Answer
//! like a pirate.", PEFT's TEXT initialisation of prompt tuning) and is then
//! moved a fraction of the way towards the rows' mean, so it is no longer
//! any token's row. The table compares how likely one pirate-flavoured reply
//! is with no prefix, the instruction as tokens, its exact rows, and the
//! soft rows.
//!
//! `make test` runs it, and it checks the one thing it can know in advance:
//! the instruction's exact rows score the reply as its tokens do (each
//! log-probability within 1e-4). Otherwise, or without the GGUF (`make
//! models` fetches it), it fails.

use std::ops::ControlFlow;
use std::path::PathBuf;

use tofy::decoder::llama::LlamaDecoder;
use tofy::decoder::llama::ffi::TokenEmbeddings;
use tofy::decoder::{
    ChatMessage, Decoder, DecoderConfig, EMBEDDINGS_MARKER, Embeddings, GenerateRequest, Prompt,
    Role, Sampling, ScoreRequest,
};

const INSTRUCTION: &str = "Answer like a pirate.";
const QUESTION: &str = "What is the sea like today?";
const REPLY: &str = "Arr, the sea be rough today, matey!<|im_end|>";

fn main() -> anyhow::Result<()> {
    let gguf = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    anyhow::ensure!(
        gguf.exists(),
        "{} not found; `make models` fetches it",
        gguf.display()
    );
    let config = DecoderConfig {
        ctx: 512,
        ngl: 0,
        ..DecoderConfig::default()
    };
    let decoder = LlamaDecoder::load(&gguf, &config)?;
    let table = TokenEmbeddings::open(&gguf)?;
    println!(
        "{}: {} tokens, rows of {} (decoder input width {:?})",
        gguf.display(),
        table.n_vocab(),
        table.width(),
        decoder.input_width()
    );

    // The instruction's own rows, and a soft version of them.
    let tokens = decoder.tokenize(INSTRUCTION, false)?;
    let exact = Embeddings::new(table.rows(&tokens)?, table.width())?;
    let soft = soften(&exact, 0.3)?;

    // A conversation whose system message holds the rows at the marker.
    let with_rows = |rows: &Embeddings| Prompt::Chat {
        messages: vec![
            ChatMessage::new(Role::System, EMBEDDINGS_MARKER),
            ChatMessage::new(Role::User, QUESTION),
        ],
        embeddings: vec![rows.clone()],
    };
    let with_text = |system: &str| {
        Prompt::chat(vec![
            ChatMessage::new(Role::System, system),
            ChatMessage::new(Role::User, QUESTION),
        ])
    };
    let prompts = [
        ("no prefix (empty system message)", with_text("")),
        ("instruction as tokens", with_text(INSTRUCTION)),
        ("instruction as its exact rows", with_rows(&exact)),
        ("soft rows (30% towards their mean)", with_rows(&soft)),
    ];

    println!("\nreply NLL per token of {REPLY:?}:");
    let mut scores = Vec::new();
    for (name, prompt) in &prompts {
        let score = decoder.score(&ScoreRequest {
            prompt: prompt.clone(),
            continuation: REPLY.to_string(),
            cancel: None,
            control: None,
        })?;
        println!(
            "  {name:<40} {:.3} over {} tokens (prompt {} positions)",
            score.mean_nll(),
            score.tokens.len(),
            score.prompt_tokens
        );
        scores.push(score);
    }
    // The check: a token's own embedding row is that token to the model.
    let (tokens, rows) = (&scores[1], &scores[2]);
    anyhow::ensure!(
        tokens.tokens == rows.tokens && tokens.prompt_tokens == rows.prompt_tokens,
        "the exact rows and the tokens scored different positions"
    );
    let diff = tokens
        .logprobs
        .iter()
        .zip(&rows.logprobs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    anyhow::ensure!(
        diff <= 1e-4,
        "the instruction's exact rows must score the reply as its tokens do: max |diff| {diff:e}"
    );
    println!("  (exact rows vs tokens: max |log-prob diff| {diff:.1e}, within 1e-4)");

    println!("\ngreedy reply after the soft rows:");
    let request = GenerateRequest {
        prompt: prompts[3].1.clone(),
        ..GenerateRequest::chat(Vec::new(), 40, Sampling::greedy())
    };
    let generation = decoder.generate(&request, &mut |piece| {
        print!("{piece}");
        ControlFlow::Continue(())
    })?;
    println!(
        "\n({} prompt positions, {} of them embedding rows; {} tokens generated)",
        generation.prompt_tokens,
        soft.n_rows(),
        generation.completion_tokens
    );
    Ok(())
}

/// Each row moved `t` of the way towards the rows' mean.
fn soften(rows: &Embeddings, t: f32) -> anyhow::Result<Embeddings> {
    let width = rows.width();
    let mut mean = vec![0.0f32; width];
    for r in 0..rows.n_rows() {
        for (m, v) in mean.iter_mut().zip(rows.row(r)) {
            *m += v / rows.n_rows() as f32;
        }
    }
    let data = (0..rows.n_rows())
        .flat_map(|r| {
            rows.row(r)
                .iter()
                .zip(&mean)
                .map(|(v, m)| v + t * (m - v))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(Embeddings::new(data, width)?)
}
