//! Damaged model files through the real binary: empty, truncated,
//! wrong-magic and bit-flipped copies of a world checkpoint, its vocab, the
//! GGUF, a projector and a control map. Each run must end in one readable
//! error line or, where the damage is in the data and cannot be told from a
//! real value (a flipped weight, a vocab token spelled otherwise), in a
//! normal run. Never a panic, a signal (llama.cpp aborting) or a hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Rng;

/// How a run ended.
#[derive(Debug)]
enum Ending {
    Ran,
    /// Its one error line.
    Error(String),
}

/// Runs `tofy ARGS` (clean decoder environment plus `env`) and checks it
/// ended well: exit 0, or exit 1 with exactly one `error: ` line. Hangs are
/// caught at 120 s.
fn run(args: &[&str], env: &[(&str, &str)], what: &str) -> Ending {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tofy"));
    for (key, _) in std::env::vars() {
        if key.starts_with("JEPA_DECODER_") || key.starts_with("TOFY_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .env("JEPA_DECODER_THREADS", "1")
        .env("JEPA_DECODER_MODEL", common::smollm2())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("run tofy");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("wait for tofy"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what}: tofy hung (killed after 120 s)");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => Ending::Ran,
        Some(1) => {
            let lines: Vec<&str> = stderr.lines().collect();
            assert!(
                lines.len() == 1 && lines[0].starts_with("error: "),
                "{what}: one error line, got {stderr:?}"
            );
            Ending::Error(lines[0].to_string())
        }
        _ => panic!(
            "{what}: ended with {} (a panic or a signal): {stderr}",
            out.status
        ),
    }
}

/// Named damaged copies of `bytes`: empty, cut short, its first bytes
/// replaced, and `flips` single-bit flips at seeded places, a third of them
/// in the first `head` bytes (where the structure is).
fn damaged(bytes: &[u8], head: usize, flips: usize, seed: u64) -> Vec<(String, Vec<u8>, bool)> {
    // (name, bytes, whether an error is required)
    let mut out = vec![
        ("empty".to_string(), Vec::new(), true),
        ("cut to 9 bytes".to_string(), bytes[..9].to_vec(), true),
        (
            "cut in half".to_string(),
            bytes[..bytes.len() / 2].to_vec(),
            true,
        ),
    ];
    let mut magic = bytes.to_vec();
    magic[..8].copy_from_slice(b"\xffNOT-IT\xff");
    out.push(("wrong magic".to_string(), magic, true));
    let mut rng = Rng::new(seed);
    for i in 0..flips {
        let span = if i % 3 == 0 {
            head.min(bytes.len())
        } else {
            bytes.len()
        };
        let at = (rng.next_u64() % span as u64) as usize;
        let bit = rng.next_u64() % 8;
        let mut flipped = bytes.to_vec();
        flipped[at] ^= 1 << bit;
        out.push((format!("bit {bit} of byte {at} flipped"), flipped, false));
    }
    out
}

/// Writes each damaged copy of `original` to `dir/name` in turn and runs
/// `args` (where `{}` stands for the copy's path) on it.
fn each_damaged_copy(
    original: &Path,
    head: usize,
    flips: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> Vec<Ending> {
    let dir = tempfile::tempdir().unwrap();
    let name = original.file_name().unwrap();
    let path: PathBuf = dir.path().join(name);
    let bytes = std::fs::read(original).unwrap();
    let mut endings = Vec::new();
    for (damage, copy, must_fail) in damaged(&bytes, head, flips, 7) {
        std::fs::write(&path, &copy).unwrap();
        let what = format!("{} ({damage})", name.to_string_lossy());
        let path_text = path.display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{}", &path_text)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, String)> = env
            .iter()
            .map(|(k, v)| (*k, v.replace("{}", &path_text)))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ending = run(&args, &env, &what);
        if let Ending::Error(line) = &ending {
            // The error names the file it is about.
            assert!(line.contains(name.to_str().unwrap()), "{what}: {line}");
        } else {
            assert!(!must_fail, "{what}: damaged this way it must not load");
        }
        eprintln!("{what}: {ending:?}");
        endings.push(ending);
    }
    endings
}

fn world_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/world")
}

#[test]
fn a_damaged_world_checkpoint_or_vocab() {
    let model = world_dir().join("model_world_1.51M.safetensors");
    let vocab = world_dir().join("vocab_world.txt");
    let (model_text, vocab_text) = (model.display().to_string(), vocab.display().to_string());
    each_damaged_copy(
        &model,
        4096,
        12,
        &["condition", "{}", &vocab_text, "hello there"],
        &[],
    );
    let endings = each_damaged_copy(
        &vocab,
        4096,
        12,
        &["condition", &model_text, "{}", "hello there"],
        &[],
    );
    assert!(endings.iter().any(|e| matches!(e, Ending::Error(_))));
}

#[test]
fn a_damaged_gguf() {
    // The header (metadata and the vocabulary) is SmolLM2's first ~600 KB.
    each_damaged_copy(
        &common::smollm2(),
        600_000,
        9,
        &["infer-agent", "hi", "--max-new-tokens", "1"],
        &[("JEPA_DECODER_MODEL", "{}")],
    );
}

#[test]
fn a_damaged_projector_or_control_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, mode, flag, flips) in [
        (
            "projector/smollm2-135m-trained.safetensors",
            "prefix",
            "--projector",
            9,
        ),
        (
            "control/smollm2-135m-l10-20.safetensors",
            "cvec",
            "--control",
            6,
        ),
    ] {
        let args = [
            "infer-agent",
            "hi",
            "--max-new-tokens",
            "1",
            "--cond-mode",
            mode,
            flag,
            "{}",
        ];
        each_damaged_copy(&root.join("models").join(file), 1024, flips, &args, &[]);
    }
}
