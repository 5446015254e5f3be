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
    // The input centred on the vectors' mean, the start weight kept: the
    // rows are still the projector's.
    let vectors: Vec<&[f32]> = all.iter().map(|e| e.vector.as_slice()).collect();
    let owned: Vec<Vec<f32>> = vectors.iter().map(|v| v.to_vec()).collect();
    let centred = tp::Start {
        centre: tofy::eval_conditioning::mean_vector(&owned),
        constant: None,
        keep_weight: true,
        bias_only: false,
        weight_rate: 1.0,
    };
    let trainable = TrainableProjector::new(&init, centred.clone()).unwrap();
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
        eval_every: 25,
        patience: 3,
        checkpoint: None,
        run: "test".into(),
        inputs: "test".into(),
    };
    let mut last = None;
    let report = tp::train(
        &scorer,
        &trainable,
        &examples,
        &[],
        &config,
        &mut |_, step| {
            last = Some(step);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(report.losses.len(), 6);
    assert_eq!(last, Some(6), "without validation the last step is kept");
    assert!(
        (report.losses[0] - start).abs() < 1e-4,
        "{report:?} vs {start}"
    );
    let end = loss(&trainable);
    assert!(end < start - 0.2, "{start} -> {end}");
    // The saved projector folds the centre into its bias: it projects raw
    // vectors to the rows training used.
    let saved = trainable.projector("trained".into()).unwrap();
    let rows = trainable.rows(&vectors[2..3]).unwrap();
    let got: Vec<f32> = rows.flatten_all().unwrap().to_vec1().unwrap();
    let want = saved.project(vectors[2]).unwrap();
    for (a, b) in got.iter().zip(want.as_slice()) {
        assert!((a - b).abs() < 1e-4, "trained rows {a} vs saved rows {b}");
    }

    // With the weight at 0 every vector starts with the same rows: the
    // starting projector's rows of the centre.
    let flat = TrainableProjector::new(
        &init,
        tp::Start {
            keep_weight: false,
            ..centred
        },
    )
    .unwrap();
    let both = flat.rows(&vectors[..2]).unwrap();
    let (a, b) = (both.get(0).unwrap(), both.get(1).unwrap());
    let gap = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(gap.to_scalar::<f32>().unwrap(), 0.0);

    // The command: two steps on the pairs file, a projector that loads.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.tsv");
    pairs::write(&path, &pairs()).unwrap();
    // Batches of 3 pairs into `out`; its stderr, after checking it succeeded.
    let train = |out: &Path, extra: &[&str]| {
        let run = Command::new(env!("CARGO_BIN_EXE_tofy"))
            .args(["train-projector", path.to_str().unwrap(), "--out"])
            .arg(out)
            .args(["--batch", "3"])
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
    let stderr = train(&out, &["--steps", "2", "--log-every", "1", "--keep-weight"]);
    assert!(stderr.contains("step 2/2: loss"), "{stderr}");
    assert!(stderr.contains("the frozen model vs llama.cpp"), "{stderr}");
    let trained = Projector::load(&out).unwrap();
    assert_eq!((trained.k(), trained.n_embd()), (4, 576));
    assert_eq!(trained.row_norm(), init.row_norm());
    assert_ne!(trained.parameters().0, init.parameters().0);

    // --bias-only: a soft prompt. The weight stays 0 through training, only
    // the bias moves, and every vector gets the same rows.
    let soft_file = dir.path().join("soft.safetensors");
    train(&soft_file, &["--steps", "2", "--bias-only"]);
    let soft = Projector::load(&soft_file).unwrap();
    let (weight, bias) = soft.parameters();
    assert!(weight.iter().all(|&w| w == 0.0), "the weight stays 0");
    // It moved from where it started: the starting projector's rows of
    // the pairs' mean vector.
    let (w0, b0) = init.parameters();
    let mean = tofy::eval_conditioning::mean_vector(&owned);
    let moved = bias.iter().enumerate().any(|(r, b)| {
        let w = &w0[r * init.bridge_dim()..(r + 1) * init.bridge_dim()];
        let start = b0[r] + w.iter().zip(&mean).map(|(a, z)| a * z).sum::<f32>();
        (b - start).abs() > 1e-4
    });
    assert!(moved, "training moved the soft prompt's rows");
    let (a, b) = (
        soft.project(vectors[0]).unwrap(),
        soft.project(vectors[1]).unwrap(),
    );
    assert_eq!(a, b, "one set of rows for every vector");

    // Validation, the plateau and the checkpoint, on oracle vectors from
    // the soft prompt's constant: a run stopped after 3 steps (off the
    // validation grid of every 2) and resumed ends where an uninterrupted
    // run of 4 ends.
    let resumable = |out: &Path, steps: &str| {
        let args = [
            "--vectors",
            "oracle",
            "--constant",
            soft_file.to_str().unwrap(),
            "--valid",
            path.to_str().unwrap(),
            "--valid-n",
            "4",
            "--eval-every",
            "2",
            "--patience",
            "5",
            "--steps",
            steps,
        ];
        train(out, &args)
    };
    let straight = dir.path().join("straight.safetensors");
    let stderr = resumable(&straight, "4");
    for step in [0, 2, 4] {
        assert!(
            stderr.contains(&format!("step {step}: validation")),
            "{stderr}"
        );
    }
    // A trained step is kept (validation is these very pairs), so the two
    // runs below are compared on trained parameters, not on the start.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("validation") && l.contains("(best)") && !l.contains("step 0:")),
        "{stderr}"
    );
    let stopped = dir.path().join("stopped.safetensors");
    let first = resumable(&stopped, "3");
    let stderr = resumable(&stopped, "4");
    assert!(stderr.contains("resuming"), "{stderr}");
    assert!(
        !first.contains("step 3: validation") && !stderr.contains("step 2: validation"),
        "only the grid is scored, once: {first} {stderr}"
    );
    let state = |p: &Path| {
        let mut run = p.as_os_str().to_owned();
        run.push(".run.safetensors");
        std::path::PathBuf::from(run)
    };
    assert!(state(&straight).exists());
    // Both runs keep their best validation step's projector; the resumed
    // run's parameters match the straight run's.
    let (a, b) = (
        Projector::load(&straight).unwrap(),
        Projector::load(&stopped).unwrap(),
    );
    for (x, y) in a.parameters().0.iter().zip(b.parameters().0) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    for (x, y) in a.parameters().1.iter().zip(b.parameters().1) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // --world-contexts: the world model reads a twin file's contexts (and
    // --valid's twin, beside it).
    let twin_of = |p: &Path| tofy::data::pairs::history_path(p);
    let longer: Vec<Pair> = pairs()
        .into_iter()
        .map(|p| Pair {
            context: format!("we just met | {}", p.context),
            next: p.next,
        })
        .collect();
    pairs::write(&twin_of(&path), &longer).unwrap();
    let stderr = train(
        &dir.path().join("history.safetensors"),
        &[
            "--steps",
            "1",
            "--eval-every",
            "1",
            "--valid",
            path.to_str().unwrap(),
            "--world-contexts",
            twin_of(&path).to_str().unwrap(),
        ],
    );
    assert!(stderr.contains("step 1: validation"), "{stderr}");

    // Another run's checkpoint is refused with what to do.
    let run = Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(["train-projector", path.to_str().unwrap(), "--out"])
        .arg(&stopped)
        .args(["--steps", "2", "--batch", "3", "--lr", "1e-3"])
        .env("JEPA_DECODER_MODEL", common::smollm2())
        .env("JEPA_DECODER_THREADS", "2")
        .output()
        .unwrap();
    let line = common::fails(run);
    assert!(
        line.contains("another run") && line.contains("delete it"),
        "{line}"
    );
}
