//! `tofy condition` as a user runs it: the real binary on real files, its
//! JSON output, and one readable error line for each kind of bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fails, fixture_dir};

fn tofy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(args)
        .env_remove("TOFY_THREADS")
        .output()
        .expect("run tofy")
}

fn fixture_model() -> String {
    fixture_dir()
        .join("model_world_tiny.safetensors")
        .display()
        .to_string()
}

fn fixture_vocab() -> String {
    fixture_dir().join("vocab_world.txt").display().to_string()
}

/// The fixture's sizes that shapes cannot tell (it has no metadata, like the seed's files).
const SIZES: [&str; 4] = ["--heads", "4", "--max-seq", "16"];

fn condition(model: &str, vocab: &str, prompts: &[&str], extra: &[&str]) -> Output {
    let mut args = vec!["condition", model, vocab];
    args.extend(prompts);
    args.extend(extra);
    tofy(&args)
}

#[test]
fn json_lines_round_trip_and_match_the_reference() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap(),
    )
    .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let prompts: Vec<&str> = cases
        .iter()
        .map(|c| c["prompt"].as_str().unwrap())
        .collect();
    let mut extra = SIZES.to_vec();
    extra.push("--json");
    let out = condition(&fixture_model(), &fixture_vocab(), &prompts, &extra);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), cases.len(), "one JSON object per prompt");
    for (line, case) in lines.iter().zip(cases) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["prompt", "tokens", "conditioning"],
            "the documented order"
        );
        assert_eq!(v["prompt"], case["prompt"]);
        assert_eq!(v["tokens"], case["tokens"]);
        let got: Vec<f32> = serde_json::from_value(v["conditioning"].clone()).unwrap();
        let want: Vec<f64> = serde_json::from_value(case["conditioning"].clone()).unwrap();
        assert!(common::max_relative_error(&got, &want) <= 1e-5);
        // Shortest round-trip form: each printed number parses to an f32
        // that prints back as the same text.
        let text = line
            .split("\"conditioning\":[")
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap();
        for (num, &f) in text.split(',').zip(&got) {
            assert_eq!(num.parse::<f32>().unwrap(), f);
            assert_eq!(serde_json::to_string(&f).unwrap(), num);
        }
    }
}

#[test]
fn human_summary_and_ablation() {
    let out = condition(
        &fixture_model(),
        &fixture_vocab(),
        &["Hi, it's 5pm!"],
        &SIZES,
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("dim 48, layers 2, heads 4, max_seq 16, vocab 43, bridge 24"),
        "{text}"
    );
    assert!(
        text.contains("\"Hi, it's 5pm!\": 5 tokens -> 24 values"),
        "{text}"
    );

    let mut extra = SIZES.to_vec();
    extra.extend(["--json", "--ablate-conditioning"]);
    let out = condition(
        &fixture_model(),
        &fixture_vocab(),
        &["Hi, it's 5pm!", "x"],
        &extra,
    );
    assert!(out.status.success());
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let got: Vec<f32> = serde_json::from_value(v["conditioning"].clone()).unwrap();
        assert_eq!(got, vec![0.0; 24]);
    }
}

#[test]
fn defaults_apply_without_size_arguments() {
    // No metadata and no flags: the seed's defaults (8 heads, 128 positions).
    let out = condition(&fixture_model(), &fixture_vocab(), &["hello"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("heads 8, max_seq 128"), "{text}");
}

/// A raw tensor for hand-built safetensors files.
struct Raw {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// The fixture's tensors, to be edited and written back with [`write_raw`].
fn fixture_tensors() -> Vec<Raw> {
    let bytes = std::fs::read(fixture_model()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Raw> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Raw {
            name,
            dtype: format!("{:?}", t.dtype()),
            shape: t.shape().to_vec(),
            bytes: t.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes a safetensors file by hand, so tests can make any dtype or shape.
fn write_raw(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    for t in tensors {
        file.extend(&t.bytes);
    }
    std::fs::write(path, file).unwrap();
}

fn edited(dir: &Path, edit: impl FnOnce(&mut Vec<Raw>)) -> String {
    let mut tensors = fixture_tensors();
    edit(&mut tensors);
    let path: PathBuf = dir.join("model_world_edited.safetensors");
    write_raw(&path, &tensors);
    path.display().to_string()
}

#[test]
fn hand_written_copy_of_the_fixture_loads() {
    // Guards the helpers below: an unedited rewrite must load fine.
    let dir = tempfile::tempdir().unwrap();
    let model = edited(dir.path(), |_| {});
    assert!(
        condition(&model, &fixture_vocab(), &["hello"], &SIZES)
            .status
            .success()
    );
}

#[test]
fn bad_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vocab = fixture_vocab();
    let run = |model: &str| fails(condition(model, &vocab, &["hello"], &SIZES));

    let missing = d.join("nope.safetensors").display().to_string();
    let e = run(&missing);
    assert!(
        e.contains(&missing)
            && e.contains("cannot read file")
            && e.matches("No such file").count() == 1,
        "{e}"
    );

    let e = run(&d.display().to_string());
    assert!(
        e.contains("not a safetensors file (it is a directory)"),
        "{e}"
    );

    let text = d.join("notes.safetensors");
    std::fs::write(&text, "this is just some text, not tensors at all\n").unwrap();
    let e = run(&text.display().to_string());
    assert!(
        e.contains(&text.display().to_string()) && e.contains("not a safetensors file"),
        "{e}"
    );

    let tiny = d.join("tiny.safetensors");
    std::fs::write(&tiny, b"abc").unwrap();
    assert!(
        run(&tiny.display().to_string()).contains("not a safetensors file (only 3 bytes long)")
    );

    let bytes = std::fs::read(fixture_model()).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = run(&cut.display().to_string());
    assert!(
        e.contains("truncated") && e.contains(&format!("the file holds {} bytes", bytes.len() / 2)),
        "{e}"
    );
    assert!(
        e.contains(&format!("describes a {}-byte file", bytes.len())),
        "{e}"
    );

    let e = run(&edited(d, |t| {
        t.retain(|t| t.name != "encoder.block_1.ff1.bias")
    }));
    assert!(
        e.contains("missing tensor `encoder.block_1.ff1.bias`"),
        "{e}"
    );

    let e = run(&edited(d, |t| {
        t.retain(|t| t.name != "decoder_bridge.proj.weight")
    }));
    assert!(
        e.contains("missing tensor `decoder_bridge.proj.weight`"),
        "{e}"
    );

    let e = run(&edited(d, |t| {
        let ff1 = t
            .iter_mut()
            .find(|t| t.name == "encoder.block_0.ff1.weight")
            .unwrap();
        ff1.shape = vec![96, 96]; // same byte count as [192, 48]
    }));
    assert!(
        e.contains("tensor `encoder.block_0.ff1.weight` has shape [96, 96], expected [192, 48]"),
        "{e}"
    );

    let e = run(&edited(d, |t| {
        let q = t
            .iter_mut()
            .find(|t| t.name == "encoder.block_1.attn.q_proj.bias")
            .unwrap();
        q.dtype = "I32".into();
    }));
    assert!(
        e.contains("tensor `encoder.block_1.attn.q_proj.bias` has dtype I32, expected F32"),
        "{e}"
    );

    let e = run(&edited(d, |t| {
        let b = t
            .iter_mut()
            .find(|t| t.name == "encoder.ln_final.bias")
            .unwrap();
        b.bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    }));
    assert!(
        e.contains("tensor `encoder.ln_final.bias` contains NaN"),
        "{e}"
    );
}

#[test]
fn arguments_that_contradict_the_checkpoint() {
    let (model, vocab) = (fixture_model(), fixture_vocab());
    let e = fails(condition(&model, &vocab, &["hello"], &["--heads", "5"]));
    assert!(
        e.contains(&model) && e.contains("dim 48") && e.contains("not divisible by num_heads 5"),
        "{e}"
    );

    let e = fails(condition(&model, &vocab, &["hello"], &["--dim", "64"]));
    assert!(e.contains("tensor `encoder.embed.weight` has shape [43, 48], expected [43, 64] (dim 64 from --dim)"), "{e}");

    let e = fails(condition(
        &model,
        &vocab,
        &["hello"],
        &["--bridge-dim", "256", "--heads", "4"],
    ));
    assert!(
        e.contains("tensor `decoder_bridge.proj.weight` has shape [24, 48], expected [256, 48]"),
        "{e}"
    );

    let e = fails(condition(
        &model,
        &vocab,
        &["hello"],
        &["--layers", "4", "--heads", "4"],
    ));
    assert!(
        e.contains("checkpoint has 2 encoder blocks") && e.contains("4 were requested by --layers"),
        "{e}"
    );

    // Agreeing arguments are fine.
    let ok = condition(
        &model,
        &vocab,
        &["hello"],
        &[
            "--dim",
            "48",
            "--layers",
            "2",
            "--bridge-dim",
            "24",
            "--heads",
            "4",
        ],
    );
    assert!(ok.status.success());
}

#[test]
fn bad_vocab_files_and_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model();

    let empty = dir.path().join("empty_vocab.txt");
    std::fs::write(&empty, "").unwrap();
    let e = fails(condition(
        &model,
        &empty.display().to_string(),
        &["hello"],
        &SIZES,
    ));
    assert!(
        e.contains(&empty.display().to_string()) && e.contains("vocab file is empty"),
        "{e}"
    );

    let short = dir.path().join("short_vocab.txt");
    std::fs::write(&short, "<pad>\n<unk>\n<mask>\nhello\n").unwrap();
    let e = fails(condition(
        &model,
        &short.display().to_string(),
        &["hello"],
        &SIZES,
    ));
    assert!(
        e.contains("vocab has 4 tokens") && e.contains("has 43 rows"),
        "{e}"
    );

    let missing = dir.path().join("missing.txt").display().to_string();
    let e = fails(condition(&model, &missing, &["hello"], &SIZES));
    assert!(
        e.contains(&missing) && e.contains("cannot read file"),
        "{e}"
    );

    let e = fails(condition(
        &model,
        &fixture_vocab(),
        &["hello", " \t\n"],
        &SIZES,
    ));
    assert_eq!(
        e,
        "error: prompt 2 is empty or whitespace-only: there is nothing to condition on"
    );
}

#[test]
fn prompts_alone_use_the_embedded_default_world_model() {
    let out = tofy(&["condition", "hello there, how are you?", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["tokens"], 7);
    let first: Vec<f32> = serde_json::from_value(line["conditioning"].clone()).unwrap();
    assert_eq!(first.len(), 256);
    assert!(first.iter().any(|&v| v != 0.0));

    // The same prompt through the committed files gives the same vector.
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/world/model_world_1.51M.safetensors");
    let vocab = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/world/vocab_world.txt");
    let out = condition(
        &model.display().to_string(),
        &vocab.display().to_string(),
        &["hello there, how are you?"],
        &["--json"],
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let from_files: Vec<f32> = serde_json::from_value(line["conditioning"].clone()).unwrap();
    assert_eq!(first, from_files);

    let text = String::from_utf8(tofy(&["condition", "hi"]).stdout).unwrap();
    assert!(
        text.starts_with("world model models/world/model_world_1.51M.safetensors (dim 128"),
        "{text}"
    );
}

#[test]
fn a_model_without_vocab_and_prompt_is_an_error() {
    let e = fails(tofy(&["condition", "model_world_x.safetensors", "hi"]));
    assert!(
        e.contains("nothing follows them; usage: [MODEL VOCAB] PROMPT..."),
        "{e}"
    );
    let e = fails(tofy(&["condition", "model_world_x.safetensors"]));
    assert!(e.contains("no vocab_world.txt follows it"), "{e}");
}

/// `tofy bench-world`, what the GPU check runs on each device: one timing line per batch
/// size, and a dump whose vectors are the reference's whichever batch computed them.
#[test]
fn bench_world_times_each_batch_size_and_dumps_the_reference_vectors() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap(),
    )
    .unwrap();
    // One prompt per line: the reference's multi-line prompt cannot be written so.
    let cases: Vec<&serde_json::Value> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["prompt"].as_str().unwrap().contains('\n'))
        .collect();
    assert_eq!(cases.len(), 4);
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let text: Vec<&str> = cases
        .iter()
        .map(|c| c["prompt"].as_str().unwrap())
        .collect();
    std::fs::write(&prompts, text.join("\n")).unwrap();
    let dump = dir.path().join("dump.json");
    let (model, vocab) = (fixture_model(), fixture_vocab());
    let mut args = vec!["bench-world", &model, &vocab];
    args.extend(SIZES);
    let (prompts, dump_arg) = (prompts.display().to_string(), dump.display().to_string());
    args.extend([
        "--device",
        "cpu",
        "--batch",
        "1,3",
        "--iters",
        "2",
        "--prompts",
        &prompts,
        "--dump",
        &dump_arg,
    ]);
    let out = tofy(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one line per batch size");
    for (line, batch) in lines.iter().zip([1, 3]) {
        assert_eq!(line["batch"], batch);
        assert_eq!(line["iters"], 2);
        assert!(line["device"].as_str().unwrap().starts_with("cpu"));
        let (p10, median, p90) = (
            line["p10_ms"].as_f64().unwrap(),
            line["median_ms"].as_f64().unwrap(),
            line["p90_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < p10 && p10 <= median && median <= p90, "{line}");
    }
    let dumped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    let runs = dumped["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let got = run["prompts"].as_array().unwrap();
        assert_eq!(got.len(), cases.len());
        for (p, case) in got.iter().zip(&cases) {
            assert_eq!(p["ids"].as_array().unwrap().len(), case["tokens"]);
            let vector: Vec<f32> = serde_json::from_value(p["conditioning"].clone()).unwrap();
            let want: Vec<f64> = serde_json::from_value(case["conditioning"].clone()).unwrap();
            assert!(common::max_relative_error(&vector, &want) <= 1e-5);
            assert_eq!(p["state"].as_array().unwrap().len(), 48);
        }
    }

    // Bad input: one line.
    let line = fails(tofy(&["bench-world", "--batch", "33"]));
    assert!(line.contains("33 is not in 1..=32"), "{line}");
}
