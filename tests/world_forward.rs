//! The ndarray forward pass against the f64 reference on random checkpoints
//! of several shapes, plus batching, determinism and real-loading checks.

mod common;

use common::{
    config, max_relative_error, reference_bridge_of_latent, reference_forward, reference_ids,
    write_checkpoint,
};
use tofy::world::{LoadOptions, WorldConfig, WorldModel, WorldOverrides};

const TOLERANCE: f64 = 1e-5;

const PROMPTS: &[&str] = &[
    "hello world",
    "Hi, it's 5pm!",
    "write a short gpu recommendation, the café's é is unknown? ünïcode",
    "x",
    "a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a a",
];

fn check_against_reference(cfg: WorldConfig, metadata: bool, threads: usize) {
    let dir = tempfile::tempdir().unwrap();
    let written = write_checkpoint(dir.path(), &cfg, 7 + cfg.dim as u64, metadata);
    let overrides = if metadata {
        WorldOverrides::default()
    } else {
        WorldOverrides {
            num_heads: Some(cfg.num_heads),
            max_seq: Some(cfg.max_seq),
            ..Default::default()
        }
    };
    let options = LoadOptions {
        overrides,
        threads: Some(threads),
        ..Default::default()
    };
    let model = WorldModel::load(&written.model, &written.vocab, &options).unwrap();
    assert_eq!(model.config(), &cfg, "sizes read back from the checkpoint");
    let got = model.condition_batch(PROMPTS).unwrap();
    for (prompt, got) in PROMPTS.iter().zip(&got) {
        let ids = reference_ids(&written.vocab, prompt, cfg.max_seq);
        assert_eq!(got.tokens, ids.len(), "{prompt:?}");
        let want = reference_forward(&written.tensors, &cfg, &ids);
        let err = max_relative_error(&got.vector, &want);
        assert!(
            err <= TOLERANCE,
            "{cfg:?} {prompt:?}: max relative error {err:e}"
        );
    }
}

#[test]
fn matches_reference_seed_like_shape() {
    check_against_reference(config(64, 2, 8, 32, 40, 256), true, 2);
}

#[test]
fn matches_reference_heads_not_eight_bridge_not_256() {
    check_against_reference(config(48, 3, 6, 24, 50, 40), false, 1);
}

#[test]
fn matches_reference_single_head_short_context() {
    // max_seq 8 truncates the long prompts; dim/4 < 32 exercises A = 32.
    check_against_reference(config(16, 1, 1, 8, 30, 8), true, 2);
}

#[test]
fn matches_reference_wide_transition() {
    // 3D/2 > 128 exercises H = 3D/2 and many heads.
    check_against_reference(config(96, 2, 12, 16, 64, 100), false, 2);
}

/// Batch composition and thread count must not change a single bit: a
/// prompt's vector (and so the decoder's prompt text) cannot depend on which
/// other requests shared its batch.
#[test]
fn batch_equals_single_calls_bit_for_bit_at_any_thread_count() {
    let cfg = config(64, 2, 4, 32, 40, 32);
    let dir = tempfile::tempdir().unwrap();
    let written = write_checkpoint(dir.path(), &cfg, 11, true);
    let load = |threads| {
        let options = LoadOptions {
            threads: Some(threads),
            ..Default::default()
        };
        WorldModel::load(&written.model, &written.vocab, &options).unwrap()
    };
    let (one, two) = (load(1), load(2));
    let batch = two.condition_batch(PROMPTS).unwrap();
    for (prompt, batched) in PROMPTS.iter().zip(&batch) {
        let single = one.condition(prompt).unwrap();
        assert_eq!(single, *batched, "{prompt:?}");
    }
    // More prompts than one internal micro-batch.
    let many: Vec<String> = (0..70)
        .map(|i| format!("hello world {i} tok{}", i % 20))
        .collect();
    let batched = two.condition_batch(&many).unwrap();
    for i in [0, 31, 32, 69] {
        assert_eq!(one.condition(&many[i]).unwrap(), batched[i], "prompt {i}");
    }
}

#[test]
fn deterministic_and_weights_really_loaded() {
    let cfg = config(32, 2, 4, 16, 40, 24);
    let dir_a = tempfile::tempdir().unwrap();
    let a = write_checkpoint(dir_a.path(), &cfg, 3, true);
    let model_a = WorldModel::load(&a.model, &a.vocab, &LoadOptions::default()).unwrap();
    let first = model_a.condition("hello world").unwrap();
    let again = WorldModel::load(&a.model, &a.vocab, &LoadOptions::default())
        .unwrap()
        .condition("hello world")
        .unwrap();
    assert_eq!(
        first.vector, again.vector,
        "same checkpoint, same prompt, same vector"
    );
    assert!(first.vector.iter().any(|&v| v != 0.0));

    // The same checkpoint with one weight of one block changed.
    let dir_b = tempfile::tempdir().unwrap();
    let b = write_checkpoint(dir_b.path(), &cfg, 3, true);
    let name = "encoder.block_1.ff2.weight";
    let (shape, mut values) = b.tensors[name].clone();
    values[5] += 0.5;
    let data: Vec<_> = cfg
        .tensor_specs()
        .into_iter()
        .map(|s| {
            let (shape, v) = if s.name == name {
                (&shape, &values)
            } else {
                (&b.tensors[&s.name].0, &b.tensors[&s.name].1)
            };
            (
                s.name,
                tofy::world::checkpoint::TensorData::new(shape.clone(), v),
            )
        })
        .collect();
    tofy::world::checkpoint::save(&b.model, &data, Some(cfg.metadata().into_iter().collect()))
        .unwrap();
    let changed = WorldModel::load(&b.model, &b.vocab, &LoadOptions::default())
        .unwrap()
        .condition("hello world")
        .unwrap();
    assert_ne!(
        first.vector, changed.vector,
        "one changed weight must change the vector"
    );
}

#[test]
fn encode_as_conditioning_is_the_bridge_of_the_texts_own_latent() {
    // eval-conditioning's oracle: the transition is skipped.
    let cfg = config(32, 2, 4, 16, 40, 24);
    let dir = tempfile::tempdir().unwrap();
    let w = write_checkpoint(dir.path(), &cfg, 11, true);
    let model = WorldModel::load(&w.model, &w.vocab, &LoadOptions::default()).unwrap();
    let got = model.encode_as_conditioning(PROMPTS).unwrap();
    let through = model.condition_batch(PROMPTS).unwrap();
    for ((prompt, got), through) in PROMPTS.iter().zip(&got).zip(&through) {
        let ids = reference_ids(&w.vocab, prompt, cfg.max_seq);
        let want = reference_bridge_of_latent(&w.tensors, &cfg, &ids);
        let err = max_relative_error(&got.vector, &want);
        assert!(err <= TOLERANCE, "{prompt:?}: max relative error {err:e}");
        assert_ne!(got.vector, through.vector, "the transition is skipped");
    }
}

#[test]
fn ablation_gives_zeros_of_bridge_length() {
    let cfg = config(32, 1, 4, 16, 40, 24);
    let dir = tempfile::tempdir().unwrap();
    let w = write_checkpoint(dir.path(), &cfg, 5, true);
    let model = WorldModel::load(&w.model, &w.vocab, &LoadOptions::default()).unwrap();
    let out = model.ablated(&["hello world", "x"]).unwrap();
    assert_eq!(out.len(), 2);
    for r in out {
        assert_eq!(r.vector, vec![0.0; 24]);
    }
    assert_eq!(
        model.ablated(&["hello", "  "]).unwrap_err().to_string(),
        "prompt 2 is empty or whitespace-only: there is nothing to condition on"
    );
}

#[test]
fn committed_seed_fixture_matches_numpy_reference() {
    // Written by scripts/make_seed_fixture.py: another implementation, the
    // seed's tensor names, no __metadata__, CRLF vocab with a duplicate.
    let dir = common::fixture_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let c = &expected["config"];
    let options = LoadOptions {
        overrides: WorldOverrides {
            num_heads: Some(c["num_heads"].as_u64().unwrap() as usize),
            max_seq: Some(c["max_seq"].as_u64().unwrap() as usize),
            ..Default::default()
        },
        threads: Some(2),
        ..Default::default()
    };
    let model = WorldModel::load(
        dir.join("model_world_tiny.safetensors"),
        dir.join("vocab_world.txt"),
        &options,
    )
    .unwrap();
    assert_eq!(
        model.config().vocab_size as u64,
        c["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        model.config().bridge_dim as u64,
        c["bridge_dim"].as_u64().unwrap()
    );
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<f64> = case["conditioning"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = model.condition(prompt).unwrap();
        assert_eq!(
            got.tokens as u64,
            case["tokens"].as_u64().unwrap(),
            "{prompt:?}"
        );
        let err = max_relative_error(&got.vector, &want);
        assert!(err <= TOLERANCE, "{prompt:?}: max relative error {err:e}");
    }
}
