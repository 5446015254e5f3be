//! The differentiable decoder of `tofy train-projector` against llama.cpp
//! on the real SmolLM2 GGUF, and the command itself.

#![cfg(feature = "train")]

mod common;

use std::ffi::CString;
use std::path::Path;
use std::process::Command;

use tofy::data::pairs::{self, Pair};
use tofy::decoder::llama::LlamaDecoder;
use tofy::decoder::{CacheType, DecoderConfig};
use tofy::engine::{CondSettings, Engine};
use tofy::eval_conditioning::context_vectors;
use tofy::projector::Projector;
use tofy::train::llama::FrozenLlama;
use tofy::train::projector::{self as tp, ProjectorTrainConfig, ReplyScorer, TrainableProjector};
use tofy::world::{LoadOptions, WorldModel};

const PAIRS: [(&str, &str); 6] = [
    ("hi how are you today", "i am good thanks, and you?"),
    ("what do you do for work", "i teach math at a high school"),
    ("do you like dogs", "yes i have two of them"),
    ("where are you from", "i grew up in ohio"),
    ("what is your favorite food", "pizza, for sure"),
    ("how was your day", "long, but it ended well"),
];

fn pairs() -> Vec<Pair> {
    PAIRS
        .iter()
        .map(|(c, n)| Pair {
            context: c.to_string(),
            next: n.to_string(),
        })
        .collect()
}

fn engine(gguf: &Path, cache_type: CacheType) -> Engine {
    let config = DecoderConfig {
        ctx: 1024,
        threads: 2,
        ngl: 0,
        cache_type,
        ..DecoderConfig::default()
    };
    let decoder = LlamaDecoder::load(gguf, &config).unwrap();
    let world = WorldModel::load_default(&LoadOptions::default()).unwrap();
    Engine::new(world, Box::new(decoder), CondSettings::default(), None).unwrap()
}

/// The GGUF's weights dequantised into an F32 GGUF (llama.cpp's own
/// `llama_model_quantize`, as `llama-quantize --allow-requantize ... F32`).
fn f32_copy(src: &Path, dst: &Path) {
    let (src, dst) = (
        CString::new(src.to_str().unwrap()).unwrap(),
        CString::new(dst.to_str().unwrap()).unwrap(),
    );
    // SAFETY: valid C strings and a params struct from llama.cpp's defaults.
    let rc = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = llama_cpp_sys_2::LLAMA_FTYPE_ALL_F32;
        params.allow_requantize = true;
        params.nthread = 2;
        llama_cpp_sys_2::llama_model_quantize(src.as_ptr(), dst.as_ptr(), &params)
    };
    assert_eq!(rc, 0, "llama_model_quantize failed");
}

/// The six pairs laid out for the decoder, with their world vectors.
fn examples(engine: &Engine) -> (Vec<u32>, Vec<tp::Example>) {
    let pairs = pairs();
    let vectors = context_vectors(engine.world(), &pairs).unwrap();
    let eot = engine.decoder().end_of_turn().unwrap();
    let (before, examples, skipped) = tp::examples(engine, &pairs, &vectors, 4, &eot, 192).unwrap();
    assert_eq!((examples.len(), skipped), (6, 0));
    (before, examples)
}

#[test]
fn the_frozen_decoder_scores_replies_as_llama_cpp_does() {
    // On f32 weights and an f16 KV cache, llama.cpp computes what the frozen
    // model computes, up to f16 keys and values: hundredths of a nat. (On
    // the Q4_1 GGUF, llama.cpp's 8-bit activations and the default 8-bit
    // KV cache move single tokens by tenths of a nat: the other test.)
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("smollm2-f32.gguf");
    f32_copy(&common::smollm2(), &gguf);
    let engine = engine(&gguf, CacheType::F16);
    let (before, examples) = examples(&engine);
    let model = FrozenLlama::load(&gguf).unwrap();
    let scorer = ReplyScorer::new(&model, &before).unwrap();
    let all: Vec<&tp::Example> = examples.iter().collect();
    let eot = engine.decoder().end_of_turn().unwrap();
    let agreement = tp::agreement(&engine, &scorer, &Projector::embedded(), &all, &eot).unwrap();
    // docs/conditioning.md quotes this line (`-- --nocapture`).
    eprintln!("f32 weights, f16 KV cache: {agreement:?}");
    assert!(agreement.tokens > 30, "{agreement:?}");
    assert!(agreement.max_token < 0.03, "{agreement:?}");
    assert!(agreement.max_reply < 0.005, "{agreement:?}");
}

#[test]
fn training_lowers_the_loss_and_the_command_writes_a_projector() {
    let engine = engine(&common::smollm2(), CacheType::default());
    let (before, examples) = examples(&engine);
    let model = FrozenLlama::load(&common::smollm2()).unwrap();
    let scorer = ReplyScorer::new(&model, &before).unwrap();
    let all: Vec<&tp::Example> = examples.iter().collect();
    let init = Projector::embedded();
    // On the Q4_1 GGUF llama.cpp's own 8-bit arithmetic moves the scores;
    // train-projector's guard must still pass (docs/conditioning.md quotes
    // this line).
    let eot = engine.decoder().end_of_turn().unwrap();
    let agreement = tp::agreement(&engine, &scorer, &init, &all, &eot).unwrap();
    eprintln!("Q4_1 weights, q8_0 KV cache: {agreement:?}");
    assert!(
        agreement.max_reply < tp::MAX_REPLY_DISAGREEMENT,
        "{agreement:?}"
    );
    // A few steps on these six pairs lower their loss (overfitting them is
    // the point here, not a measurement).
    let trainable = TrainableProjector::new(&init).unwrap();
    let vectors: Vec<&[f32]> = all.iter().map(|e| e.vector.as_slice()).collect();
    let loss = |t: &TrainableProjector| {
        scorer
            .loss(&t.rows(&vectors).unwrap(), &all)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let rows = trainable.rows(&vectors[..1]).unwrap();
    let want = init.project(vectors[0]).unwrap();
    let got: Vec<f32> = rows.flatten_all().unwrap().to_vec1().unwrap();
    for (a, b) in got.iter().zip(want.as_slice()) {
        assert!(
            (a - b).abs() < 1e-4,
            "candle rows {a} vs projector rows {b}"
        );
    }
    let start = loss(&trainable);
    let config = ProjectorTrainConfig {
        steps: 6,
        batch: 6,
        lr: 1e-4,
        seed: 0,
        log_every: 0,
    };
    let report = tp::train(&scorer, &trainable, &examples, &config).unwrap();
    assert_eq!(report.losses.len(), 6);
    assert!(
        (report.losses[0] - start).abs() < 1e-4,
        "{report:?} vs {start}"
    );
    let end = loss(&trainable);
    assert!(end < start - 0.2, "{start} -> {end}");

    // The command: two steps on the pairs file, a projector that loads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.tsv");
    pairs::write(&path, &pairs()).unwrap();
    // Two steps of 3 pairs into `out`; its stderr, after checking it succeeded.
    let train = |out: &Path, extra: &[&str]| {
        let run = Command::new(env!("CARGO_BIN_EXE_tofy"))
            .args(["train-projector", path.to_str().unwrap(), "--out"])
            .arg(out)
            .args(["--steps", "2", "--batch", "3"])
            .args(extra)
            .env("JEPA_DECODER_MODEL", common::smollm2())
            .env("JEPA_DECODER_THREADS", "2")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(run.status.success(), "{stderr}");
        stderr
    };
    let out = dir.path().join("trained.safetensors");
    let stderr = train(&out, &["--log-every", "1"]);
    assert!(stderr.contains("step 2/2: loss"), "{stderr}");
    assert!(stderr.contains("the frozen model vs llama.cpp"), "{stderr}");
    let trained = Projector::load(&out).unwrap();
    assert_eq!((trained.k(), trained.n_embd()), (4, 576));
    assert_eq!(trained.row_norm(), init.row_norm());
    assert_ne!(trained.parameters().0, init.parameters().0);

    // --bias-only: a soft prompt. The weight stays 0 through training, only
    // the bias moves, and every vector gets the same rows.
    let soft_file = dir.path().join("soft.safetensors");
    train(&soft_file, &["--bias-only"]);
    let soft = Projector::load(&soft_file).unwrap();
    let (weight, bias) = soft.parameters();
    assert!(weight.iter().all(|&w| w == 0.0), "the weight stays 0");
    assert_ne!(bias, init.parameters().1);
    let (a, b) = (
        soft.project(vectors[0]).unwrap(),
        soft.project(vectors[1]).unwrap(),
    );
    assert_eq!(a, b, "one set of rows for every vector");
}
