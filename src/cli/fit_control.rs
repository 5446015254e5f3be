//! `tofy fit-control`: a control map fitted in closed form, ridge
//! regression from the world vector to the reply's mean residual stream
//! over a layer range (centred on the corpus mean), written as a K = 1
//! projector with `control_layers` (`src/projector.rs`).
//!
//! The target for a pair is read from llama.cpp itself: the chat prompt of
//! the context (no conditioning message, as eval-conditioning's `none`)
//! followed by the true reply and its end-of-turn token, in one pass; the
//! mean over the reply's tokens and the layers of the outputs of those
//! layers (`l_out-<il>`, through the graph callback). The map's output is
//! rescaled to the median norm of the centred targets, so strength 1 adds a
//! typical reply's deviation from the average reply; the strength is chosen
//! by validation NLL (eval-conditioning `--control-strength`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::WorldArgs;
use super::decoder_args::DecoderArgs;
use crate::data::pairs;
use crate::decoder::llama::LlamaDecoder;
use crate::decoder::{ChatMessage, Decoder, DecoderConfig, Prompt, Role, discovery};
use crate::eval_conditioning::{context_vectors, sample};
use llama_cpp_2::token::LlamaToken;

/// Prompt + reply tokens of one pair; longer pairs are skipped.
const MAX_TOKENS: u32 = 512;
/// Pairs read in one pass (a sequence each), and their tokens in all.
const PASS_PROMPTS: u32 = 16;
const PASS_TOKENS: u32 = 1024;

#[derive(Debug, Args)]
pub struct FitControlArgs {
    /// `context<TAB>reply` training pairs (e.g. data/chitchat_pairs.fit.tsv).
    pairs: PathBuf,
    /// Where to write the control map (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    world: WorldArgs,
    /// Layers the vector is added at, inclusive, llama.cpp's numbering
    /// (`START-END`; 1 <= START, END below the last layer).
    #[arg(long, default_value = "10-20", value_name = "START-END", value_parser = parse_layers)]
    layers: (usize, usize),
    /// Ridge weight lambda on the map (the intercept is not penalised).
    #[arg(long, default_value_t = 10.0, value_name = "L")]
    ridge: f64,
    /// Pairs to fit on, drawn with --seed (all of them when there are fewer).
    #[arg(long, default_value_t = 2000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(2..))]
    n: u32,
    /// Seed of the pair sample.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    #[command(flatten)]
    decoder: DecoderArgs,
}

fn parse_layers(s: &str) -> Result<(usize, usize), String> {
    s.split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .filter(|&(a, b)| a >= 1 && a <= b)
        .ok_or_else(|| format!("'{s}' is not START-END with 1 <= START <= END (e.g. 10-20)"))
}

pub fn run(args: FitControlArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.ridge.is_finite() && args.ridge >= 0.0,
        "--ridge must be a number, 0 or more (got {})",
        args.ridge
    );
    let picked = sample(&pairs::read(&args.pairs)?, args.n as usize, args.seed);
    let world = args.world.load()?;
    let base = args.decoder.config();
    let gguf = discovery::find_model(base.model.as_deref(), &base.search_root)?.context(
        "fit-control needs a decoder GGUF: set JEPA_DECODER_MODEL or put one under ./models",
    )?;
    let config = DecoderConfig {
        ctx: MAX_TOKENS,
        parallel: 1,
        ..base
    };
    let decoder = LlamaDecoder::load(&gguf, &config)?;
    let end_of_turn = decoder
        .end_of_turn()
        .context("the GGUF has no chat template to read an end-of-turn token from")?;
    let (start, end) = args.layers;
    let mut reader =
        decoder.residual_reader(start..=end, PASS_TOKENS, PASS_PROMPTS, config.threads)?;
    let (n_embd, _) = decoder
        .control_shape()
        .expect("the llama backend applies control vectors");
    eprintln!(
        "fit-control: {} pairs of {}, layers {start}-{end}, ridge {}",
        picked.len(),
        args.pairs.display(),
        args.ridge
    );

    let vectors = context_vectors(&world, &picked)?;
    // Each pair: its world vector, its tokens and where the reply starts.
    let mut prepared = Vec::with_capacity(picked.len());
    for (pair, vector) in picked.iter().zip(vectors) {
        let prompt = Prompt::chat(vec![ChatMessage::new(Role::User, pair.context.as_str())]);
        let mut tokens = decoder.prompt_tokens(&prompt)?;
        let from = tokens.len();
        tokens.extend(decoder.tokenize(&format!("{}{end_of_turn}", pair.next), false)?);
        if tokens.len() <= MAX_TOKENS as usize {
            let tokens: Vec<LlamaToken> = tokens.into_iter().map(LlamaToken).collect();
            prepared.push((vector, tokens, from));
        }
    }
    let skipped = picked.len() - prepared.len();
    let (mut vectors, mut targets) = (Vec::new(), Vec::new());
    let mut pass: Vec<(&[LlamaToken], usize)> = Vec::new();
    let mut pass_tokens = 0;
    let mut decile = 0;
    for (i, (vector, tokens, from)) in prepared.iter().enumerate() {
        pass.push((tokens, *from));
        pass_tokens += tokens.len();
        vectors.push(vector.clone());
        let next_fits = prepared.get(i + 1).is_some_and(|(_, t, _)| {
            pass.len() < PASS_PROMPTS as usize && pass_tokens + t.len() <= PASS_TOKENS as usize
        });
        if !next_fits {
            targets.extend(reader.span_means(&pass)?);
            pass.clear();
            pass_tokens = 0;
            // A line per tenth: the reading takes minutes on a CPU.
            if (i + 1) * 10 / prepared.len() > decile {
                decile = (i + 1) * 10 / prepared.len();
                eprintln!("fit-control: {}/{} pairs read", i + 1, prepared.len());
            }
        }
    }
    anyhow::ensure!(
        vectors.len() >= 2,
        "fewer than 2 pairs fit in {MAX_TOKENS} tokens; nothing to fit"
    );
    let norm = median_centred_norm(&targets);
    let name = gguf
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let (projector, summary) =
        crate::fit_projector::fit(&vectors, &targets, 1, n_embd, args.ridge, norm, &name)
            .context("the regression is singular: use a --ridge above 0 or more pairs")?;
    let description = format!(
        "control map: ridge regression (lambda {}, {} pairs of {}, seed {}) from the world vector to the reply's centred mean residual after layers {start}-{end}, output at norm {norm}",
        args.ridge,
        summary.pairs,
        args.pairs.display(),
        args.seed
    );
    projector
        .with_control_layers(start, end)
        .save(&args.out, &description)?;
    eprintln!(
        "wrote {}: a direction of {n_embd} at layers {start}-{end} for {name}, norm {norm:.3}; R^2 on the fitted pairs {:.4}{}",
        args.out.display(),
        summary.r_squared,
        if skipped > 0 {
            format!("; {skipped} pairs longer than {MAX_TOKENS} tokens skipped")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The median L2 norm of the targets minus their mean.
fn median_centred_norm(targets: &[Vec<f32>]) -> f32 {
    let width = targets[0].len();
    let mut mean = vec![0.0f64; width];
    for t in targets {
        for (m, v) in mean.iter_mut().zip(t) {
            *m += f64::from(*v) / targets.len() as f64;
        }
    }
    let mut norms: Vec<f64> = targets
        .iter()
        .map(|t| {
            t.iter()
                .zip(&mean)
                .map(|(v, m)| (f64::from(*v) - m).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    norms.sort_by(f64::total_cmp);
    norms[norms.len() / 2] as f32
}
