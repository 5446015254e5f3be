//! `tofy infer-agent` and `tofy doctor` as a user runs them: the real binary,
//! the real SmolLM2 GGUF, the seed's environment variables, and one readable
//! error line for each bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fails, smollm2};

const WORLD: &str = "models/world/model_world_1.51M.safetensors";
const VOCAB: &str = "models/world/vocab_world.txt";

/// `tofy` in the repository root with a clean decoder environment.
fn tofy(args: &[&str], env: &[(&str, &str)]) -> Output {
    tofy_in(Path::new(env!("CARGO_MANIFEST_DIR")), args, env)
}

fn tofy_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tofy"));
    cmd.current_dir(dir).args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("JEPA_DECODER_") || key == "TOFY_THREADS" {
            cmd.env_remove(key);
        }
    }
    cmd.env("JEPA_DECODER_THREADS", "1");
    cmd.envs(env.iter().copied());
    cmd.output().expect("run tofy")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tofy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn the_seed_form_and_the_subcommand_give_the_same_reply() {
    let model = smollm2().display().to_string();
    let env = [
        ("JEPA_DECODER_MODEL", model.as_str()),
        ("JEPA_DECODER_SEED", "42"),
        ("JEPA_DECODER_NGL", "0"),
    ];
    let prompt = "write a short gpu recommendation";
    let rest = [WORLD, VOCAB, prompt, "128", "32", "2", "4", "256", "24"];
    let seed = tofy(&[&["--infer-agent"], &rest[..]].concat(), &env);
    let sub = tofy(&[&["infer-agent"], &rest[..]].concat(), &env);
    let text = stdout(&seed);
    assert!(text.trim().len() > 10, "{text:?}");
    assert_eq!(text, stdout(&sub));
    // Sampling (temperature 0.7) with another seed gives another reply.
    let other = tofy(
        &[
            "infer-agent",
            prompt,
            "--seed",
            "7",
            "--temp",
            "1.5",
            "--max-new-tokens",
            "24",
        ],
        &env,
    );
    assert_ne!(stdout(&other), text);
}

#[test]
fn json_reports_the_whole_turn() {
    let model = smollm2().display().to_string();
    let out = tofy(
        &[
            "infer-agent",
            "hello there",
            "--json",
            "--temp",
            "0",
            "--max-new-tokens",
            "16",
        ],
        &[("JEPA_DECODER_MODEL", &model), ("JEPA_DECODER_NGL", "0")],
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["backend"], "llama");
    assert_eq!(v["model"], model.as_str());
    assert_eq!(v["cond_format"], "chunks");
    assert_eq!(v["conditioning"].as_array().unwrap().len(), 256);
    assert!(v["conditioning"][0].as_f64().unwrap() != 0.0);
    assert_eq!(v["world_tokens"], 2);
    assert!(v["prompt_tokens"].as_u64().unwrap() > 20);
    assert!(v["completion_tokens"].as_u64().unwrap() >= 1);
    assert!(!v["reply"].as_str().unwrap().is_empty());
    assert!(v["timings"]["time_to_first_token_ms"].as_f64().unwrap() > 0.0);

    let ablated = tofy(
        &[
            "infer-agent",
            "hello there",
            "--json",
            "--ablate-conditioning",
            "--max-new-tokens",
            "1",
        ],
        &[("JEPA_DECODER_MODEL", &model), ("JEPA_DECODER_NGL", "0")],
    );
    let a: serde_json::Value = serde_json::from_str(stdout(&ablated).trim()).unwrap();
    assert!(
        a["conditioning"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x == 0.0)
    );
    assert_eq!(a["completion_tokens"], 1, "--max-new-tokens 1");
}

#[test]
fn models_are_discovered_under_models_and_the_cpu_build_notes_ngl() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("models/smol");
    std::fs::create_dir_all(&nested).unwrap();
    std::os::unix::fs::symlink(smollm2(), nested.join("SmolLM2.gguf")).unwrap();
    let out = tofy_in(
        dir.path(),
        &["infer-agent", "hi", "--json", "--max-new-tokens", "8"],
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["backend"], "llama");
    assert_eq!(v["model"], "./models/smol/SmolLM2.gguf");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cpu_only = !tofy::decoder::llama::gpu_offload_supported();
    assert_eq!(
        stderr.contains("JEPA_DECODER_NGL=99 ignored"),
        cpu_only,
        "the one-line notice comes exactly on a CPU-only build: {stderr}"
    );

    let doctor = tofy_in(dir.path(), &["doctor"], &[]);
    let text = stdout(&doctor);
    assert!(
        text.contains("decoder model: ./models/smol/SmolLM2.gguf (found under ./models)"),
        "{text}"
    );
    assert!(text.contains("backend:       llama (default)"), "{text}");
    let ngl_line = if cpu_only {
        "GPU layers:    99 (ignored: CPU only)"
    } else {
        "GPU layers:    99\n"
    };
    assert!(text.contains(ngl_line), "{text}");
    assert!(text.contains("threads:       1"), "{text}");
    // The copy's file name is not the one the embedded projector was made
    // for: the default mode is text; under its own name, prefix.
    assert!(
        text.contains("conditioning mode text (the default: no projector was made for this setup)"),
        "{text}"
    );
    let model = smollm2().display().to_string();
    let named = stdout(&tofy(
        &["doctor"],
        &[("JEPA_DECODER_MODEL", model.as_str())],
    ));
    assert!(
        named.contains(
            "conditioning mode prefix (the default: a projector was made for this GGUF and world model)"
        ),
        "{named}"
    );
}

#[test]
fn without_a_model_the_stub_answers_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = tofy_in(dir.path(), &["infer-agent", "are you there?"], &[]);
    let text = stdout(&out);
    assert!(text.contains("tofy stub decoder"), "{text}");
    assert!(text.contains("are you there?"), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("JEPA_DECODER_MODEL"), "{stderr}");
    assert!(stderr.contains("JEPA_DECODER_BIN"), "{stderr}");
    // Deterministic.
    assert_eq!(
        text,
        stdout(&tofy_in(
            dir.path(),
            &["infer-agent", "are you there?"],
            &[]
        ))
    );

    let forced = tofy(
        &["infer-agent", "x", "--json"],
        &[("JEPA_DECODER_BACKEND", "stub")],
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&forced).trim()).unwrap();
    assert_eq!(v["backend"], "stub");

    let doctor = stdout(&tofy_in(dir.path(), &["doctor"], &[]));
    assert!(doctor.contains("decoder model: none"), "{doctor}");
    assert!(
        doctor.contains("to fix: put a .gguf under ./models"),
        "{doctor}"
    );
}

#[test]
fn the_subprocess_backend_is_chosen_by_jepa_decoder_bin() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("fake-llama");
    std::fs::write(&bin, "#!/bin/sh\nprintf 'fake reply'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let model = smollm2().display().to_string();
    let bin = bin.display().to_string();
    let out = tofy(
        &["infer-agent", "hi", "--json"],
        &[("JEPA_DECODER_BIN", &bin), ("JEPA_DECODER_MODEL", &model)],
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["backend"], "subprocess");
    assert_eq!(v["reply"], "fake reply");
    // JEPA_DECODER_BACKEND wins over JEPA_DECODER_BIN.
    let out = tofy(
        &["infer-agent", "hi", "--json", "--max-new-tokens", "1"],
        &[
            ("JEPA_DECODER_BIN", &bin),
            ("JEPA_DECODER_MODEL", &model),
            ("JEPA_DECODER_BACKEND", "llama"),
            ("JEPA_DECODER_NGL", "0"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["backend"], "llama");
}

#[test]
fn bad_input_is_one_clear_line() {
    let model = smollm2().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let junk = junk.display().to_string();
    let dir_path = dir.path().display().to_string();
    let run = |env: &[(&str, &str)]| {
        let mut all = vec![("JEPA_DECODER_NGL", "0")];
        all.extend_from_slice(env);
        fails(tofy(&["infer-agent", "hi", "--max-new-tokens", "4"], &all))
    };
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("JEPA_DECODER_MODEL", "/nope/missing.gguf")],
            "/nope/missing.gguf: no such file",
        ),
        (vec![("JEPA_DECODER_MODEL", &dir_path)], "is a directory"),
        (
            vec![("JEPA_DECODER_MODEL", &junk)],
            "could not load this model",
        ),
        (
            vec![("JEPA_DECODER_CTX", "0")],
            "JEPA_DECODER_CTX / --ctx must be",
        ),
        (
            vec![("JEPA_DECODER_CTX", "lots")],
            "JEPA_DECODER_CTX / --ctx must be",
        ),
        (
            vec![("JEPA_DECODER_NGL", "-1")],
            "JEPA_DECODER_NGL / --ngl must be",
        ),
        (
            vec![("JEPA_DECODER_TEMP", "hot")],
            "JEPA_DECODER_TEMP / --temp must be",
        ),
        (vec![("JEPA_DECODER_BACKEND", "gpu")], "invalid value 'gpu'"),
        (
            vec![("JEPA_DECODER_COND_FORMAT", "vectors")],
            "invalid value 'vectors'",
        ),
        (
            vec![("JEPA_DECODER_COND_MODE", "soft")],
            "invalid value 'soft'",
        ),
        (
            vec![("TOFY_PROJECTOR", "/nope/p.safetensors")],
            "projector /nope/p.safetensors",
        ),
        (vec![("TOFY_PROJECTOR", &junk)], "not a safetensors file"),
        (
            // The stub takes no embedding rows.
            vec![
                ("JEPA_DECODER_BACKEND", "stub"),
                ("JEPA_DECODER_COND_MODE", "prefix"),
            ],
            "prefix conditioning needs embedding input",
        ),
        (
            vec![
                ("JEPA_DECODER_MODEL", &model),
                ("JEPA_DECODER_BACKEND", "subprocess"),
                ("JEPA_DECODER_BIN", "/nope/llama-completion"),
            ],
            "could not be started",
        ),
        (
            vec![("JEPA_DECODER_MODEL", &model), ("JEPA_DECODER_CTX", "16")],
            "context length exceeded",
        ),
    ];
    for (env, want) in cases {
        let line = run(&env);
        assert!(line.contains(want), "{env:?}: {line}");
    }
    let line = fails(tofy(&["infer-agent", "hi", "128", "x"], &[]));
    assert!(
        line.contains("max_seq 'x' is not a positive whole number"),
        "{line}"
    );
    let line = fails(tofy(&["infer-agent", WORLD, VOCAB, "hi", "100"], &[]));
    assert!(
        line.contains("encoder.embed.weight"),
        "dims checked against the checkpoint: {line}"
    );
}

#[test]
fn prefix_mode_streams_a_reply_from_projected_rows() {
    let model = smollm2().display().to_string();
    let env = [
        ("JEPA_DECODER_MODEL", model.as_str()),
        ("JEPA_DECODER_NGL", "0"),
    ];
    let run = |mode: &str| -> serde_json::Value {
        let out = tofy(
            &[
                "infer-agent",
                "write a short gpu recommendation",
                "--json",
                "--temp",
                "0",
                "--max-new-tokens",
                "12",
                "--cond-mode",
                mode,
            ],
            &env,
        );
        serde_json::from_str(stdout(&out).trim()).unwrap()
    };
    let prefix = run("prefix");
    assert_eq!(prefix["cond_mode"], "prefix");
    assert_eq!(prefix["k"], 4, "the embedded projector's K");
    assert_eq!(prefix["projector"], tofy::projector::EMBEDDED_PATH);
    assert_eq!(prefix["conditioning"].as_array().unwrap().len(), 256);
    assert!(!prefix["reply"].as_str().unwrap().trim().is_empty());
    let text = run("text");
    let none = run("none");
    assert_eq!((text["k"].as_u64(), none["k"].as_u64()), (Some(0), Some(0)));
    // Four rows in place of ~50 digit tokens; none has no message at all.
    let tokens = |v: &serde_json::Value| v["prompt_tokens"].as_u64().unwrap();
    assert!(
        tokens(&none) < tokens(&prefix) && tokens(&prefix) + 40 < tokens(&text),
        "none {} / prefix {} / text {}",
        tokens(&none),
        tokens(&prefix),
        tokens(&text)
    );

    // No mode named: prefix, since the embedded projector was made for
    // this GGUF (issue 24 rung 5); text where no projector fits the decoder
    // (the stub takes no rows).
    let default_mode = |env: &[(&str, &str)]| -> serde_json::Value {
        let out = tofy(
            &[
                "infer-agent",
                "hi",
                "--json",
                "--temp",
                "0",
                "--max-new-tokens",
                "2",
            ],
            env,
        );
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()["cond_mode"].clone()
    };
    assert_eq!(default_mode(&env), "prefix");
    assert_eq!(default_mode(&[("JEPA_DECODER_BACKEND", "stub")]), "text");

    // Streaming, as a user runs it.
    let out = tofy(
        &[
            "infer-agent",
            "hello there",
            "--max-new-tokens",
            "8",
            "--cond-mode",
            "prefix",
        ],
        &env,
    );
    assert!(!stdout(&out).trim().is_empty());

    // The random placeholder is what `make placeholder-projector` writes.
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.safetensors");
    let again_arg = again.display().to_string();
    stdout(&tofy(
        &[
            "random-projector",
            "--k",
            "4",
            "--seed",
            "0",
            "--out",
            &again_arg,
        ],
        &env,
    ));
    let z: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(
        tofy::projector::Projector::load(&again)
            .unwrap()
            .project(&z)
            .unwrap(),
        tofy::projector::Projector::load(Path::new(tofy::projector::PLACEHOLDER_PATH))
            .unwrap()
            .project(&z)
            .unwrap()
    );

    // A projector for another width is one clear error.
    let wide = dir.path().join("wide.safetensors");
    tofy::projector::Projector::random(256, 2, 640, 1.0, 0, "gemma.gguf")
        .save(&wide, "test")
        .unwrap();
    let line = fails(tofy(
        &["infer-agent", "hi", "--cond-mode", "prefix", "--projector"],
        &[],
    ));
    assert!(line.contains("--projector"), "{line}");
    let wide = wide.display().to_string();
    let line = fails(tofy(
        &[
            "infer-agent",
            "hi",
            "--cond-mode",
            "prefix",
            "--projector",
            &wide,
        ],
        &env,
    ));
    assert!(
        line.contains("makes rows of 640 values for gemma.gguf")
            && line.contains("takes rows of 576"),
        "{line}"
    );
}

#[test]
fn cvec_mode_steers_through_a_control_map() {
    let model = smollm2().display().to_string();
    let env = [
        ("JEPA_DECODER_MODEL", model.as_str()),
        ("JEPA_DECODER_NGL", "0"),
    ];
    // A control map of fixed values (what fit-control writes, not fitted:
    // this checks the plumbing, docs/conditioning.md the effect).
    let dir = tempfile::tempdir().unwrap();
    let map_path = dir.path().join("control.safetensors");
    common::write_control_map(&map_path);
    let map = map_path.display().to_string();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "infer-agent",
            "write a short gpu recommendation",
            "--json",
            "--temp",
            "0",
            "--max-new-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(stdout(&tofy(&args, &env)).trim()).unwrap()
    };
    let none = run(&["--cond-mode", "none"]);
    let cvec = run(&["--cond-mode", "cvec", "--control", &map]);
    assert_eq!(cvec["cond_mode"], "cvec");
    assert_eq!(cvec["k"], 0);
    assert_eq!(cvec["conditioning"].as_array().unwrap().len(), 256);
    assert_eq!(
        cvec["prompt_tokens"], none["prompt_tokens"],
        "no message: the vector is the only difference"
    );
    assert_ne!(
        cvec["reply"], none["reply"],
        "the control vector steers the reply"
    );
    // Strength 0 adds nothing: the unsteered reply, exactly.
    let zero = run(&[
        "--cond-mode",
        "cvec",
        "--control",
        &map,
        "--control-strength",
        "0",
    ]);
    assert_eq!(zero["reply"], none["reply"]);

    // Each wrong setup is one clear line.
    let line = fails(tofy(&["infer-agent", "hi", "--cond-mode", "cvec"], &env));
    assert!(
        line.contains("needs a control map") && line.contains("--control"),
        "{line}"
    );
    let line = fails(tofy(
        &[
            "infer-agent",
            "hi",
            "--cond-mode",
            "cvec",
            "--control",
            "models/projector/smollm2-135m-placeholder.safetensors",
        ],
        &env,
    ));
    assert!(line.contains("is not a control map"), "{line}");
    let line = fails(tofy(
        &[
            "infer-agent",
            "hi",
            "--cond-mode",
            "cvec",
            "--control",
            &map,
        ],
        &[("JEPA_DECODER_BACKEND", "stub")],
    ));
    assert!(line.contains("does not apply"), "{line}");
}

#[test]
fn ctrl_c_mid_stream_cuts_the_reply_and_exits_130() {
    use std::io::Read;
    use std::process::Stdio;

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tofy"));
    for (key, _) in std::env::vars() {
        if key.starts_with("JEPA_DECODER_") || key.starts_with("TOFY_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .args([
            "infer-agent",
            "Count from one to one thousand, one number per line.",
            "--max-new-tokens",
            "3000",
        ])
        .env("JEPA_DECODER_MODEL", smollm2())
        .env("JEPA_DECODER_THREADS", "1")
        .env("JEPA_DECODER_NGL", "0")
        .env("JEPA_DECODER_TEMP", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tofy infer-agent");
    let mut stdout = child.stdout.take().unwrap();
    // The reply has started streaming: Ctrl-C now.
    let mut first = [0u8; 1];
    stdout
        .read_exact(&mut first)
        .expect("the reply's first byte");
    common::signal(&child, libc::SIGINT);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let status = common::exit_status(&mut child, "tofy infer-agent");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{status}: {stderr}");
    assert!(
        !stderr.contains("error"),
        "no error line for Ctrl-C: {stderr}"
    );
    // Cut long before 3000 tokens of counting.
    let reply = String::from_utf8_lossy(&[&first[..], &rest].concat()).into_owned();
    assert!(!reply.contains("1000"), "{reply}");
}
