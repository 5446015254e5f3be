//! The subprocess backend against fake `llama-completion` scripts written
//! here (flags, streaming, echo and marker stripping, token counts,
//! cancellation, shutdown, failures), and against llama.cpp's real binary
//! (an ignored test: `TOFY_TEST_LLAMA_COMPLETION`, or target/peers/bin).

mod common;

use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tofy::decoder::subprocess::SubprocessDecoder;
use tofy::decoder::{
    BackendKind, ChatMessage, Decoder, DecoderConfig, DecoderError, FinishReason, GenerateRequest,
    Role, Sampling,
};

use common::{cancel_after, generate_collecting as collect};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn decoder(bin: &Path, model: &Path) -> SubprocessDecoder {
    let config = DecoderConfig {
        backend: BackendKind::Subprocess,
        bin: bin.display().to_string(),
        ctx: 512,
        ngl: 0,
        threads: 2,
        ..DecoderConfig::default()
    };
    SubprocessDecoder::new(model.to_path_buf(), &config)
}

fn request(max_new_tokens: usize) -> GenerateRequest {
    GenerateRequest::chat(
        vec![
            ChatMessage::new(Role::System, "Be brief."),
            ChatMessage::new(Role::User, "hi"),
        ],
        max_new_tokens,
        Sampling {
            seed: Some(7),
            ..Sampling::greedy()
        },
    )
}

#[test]
fn the_seed_flags_streaming_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let args_file = dir.path().join("args");
    let prompt_file = dir.path().join("prompt");
    // Echoes the prompt (as builds without --no-display-prompt do), streams
    // three pieces, ends with llama.cpp's marker and its perf lines.
    let bin = script(
        dir.path(),
        "llama-completion",
        &format!(
            r#"printf '%s\0' "$@" > {args}
while [ "$1" != "-f" ]; do shift; done; cat "$2" > {prompt}
printf '%s' "$(cat "$2")"; sleep 0.05
printf ' Hello'; sleep 0.05; printf ' from'; sleep 0.05; printf ' fake.'
printf ' [end of text]\n'
echo 'llama_perf_context_print: prompt eval time =  5.00 ms /    12 tokens (0.4 ms per token)' >&2
echo 'llama_perf_context_print:        eval time = 30.00 ms /     3 runs   (10 ms per token)' >&2
"#,
            args = args_file.display(),
            prompt = prompt_file.display()
        ),
    );
    let model = dir.path().join("m.gguf");
    std::fs::write(&model, b"").unwrap();
    let d = decoder(&bin, &model);
    let (g, pieces) = collect(&d, &request(64));
    assert_eq!(g.text, " Hello from fake.");
    assert_eq!(pieces.concat(), g.text);
    assert!(pieces.len() >= 2, "streamed as it came: {pieces:?}");
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!((g.prompt_tokens, g.completion_tokens), (12, 3));

    let args: Vec<String> = std::fs::read_to_string(&args_file)
        .unwrap()
        .split_terminator('\0')
        .map(String::from)
        .collect();
    let value = |flag: &str| {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing: {args:?}"));
        args[i + 1].clone()
    };
    assert_eq!(value("-m"), model.display().to_string());
    // The prompt goes in a file (no argument-length limit), with the one
    // trailing newline llama.cpp drops from a prompt file; removed after.
    assert_eq!(
        std::fs::read_to_string(&prompt_file).unwrap(),
        "System: Be brief.\nUser: hi\nAssistant:\n"
    );
    assert!(!Path::new(&value("-f")).exists());
    assert_eq!(value("-n"), "64");
    assert_eq!(value("-c"), "512");
    assert_eq!(value("-ngl"), "0");
    assert_eq!(value("--temp"), "0");
    assert_eq!(value("--repeat-penalty"), "1.12");
    assert_eq!(value("--seed"), "7");
    assert!(args.contains(&"--no-display-prompt".to_string()));
}

#[test]
fn a_reply_cut_at_the_limit_is_length_without_the_closing_newlines() {
    let dir = tempfile::tempdir().unwrap();
    // What llama-completion does at -n: no end marker, then "\n\n" and
    // the timings (the last token is never evaluated: 3 runs for 4 tokens).
    let bin = script(
        dir.path(),
        "limited",
        r#"printf ' one\n\ntwo three'; printf '\n\n'
echo 'llama_perf_context_print: prompt eval time = 5.00 ms / 9 tokens (0.5 ms per token)' >&2
echo 'llama_perf_context_print:        eval time = 9.00 ms / 3 runs   (3 ms per token)' >&2
"#,
    );
    let d = decoder(&bin, &dir.path().join("m.gguf"));
    let (g, pieces) = collect(&d, &request(4));
    assert_eq!(
        g.text, " one\n\ntwo three",
        "model newlines kept, closing ones dropped"
    );
    assert_eq!(pieces.concat(), g.text);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!((g.prompt_tokens, g.completion_tokens), (9, 4));
}

#[test]
fn llama_cpps_prompt_too_long_is_context_length_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let bin = script(
        dir.path(),
        "too-long",
        "echo 'main: error: prompt is too long (5000 tokens, max 508)' >&2\nexit 1\n",
    );
    let err = decoder(&bin, &dir.path().join("m.gguf"))
        .generate(&request(4), &mut |_: &str| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecoderError::ContextExceeded {
                prompt_tokens: 5000,
                context: 508
            }
        ),
        "{err}"
    );
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn cancelling_kills_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let bin = script(
        dir.path(),
        "endless",
        &format!(
            "echo $$ > {}\nfor i in $(seq 1000); do printf ' word'; sleep 0.02; done\n",
            pid_file.display()
        ),
    );
    let d = decoder(&bin, &dir.path().join("m.gguf"));
    let g = d.generate(&request(10_000), &mut cancel_after(3)).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !alive(pid),
        "the child {pid} must be killed on cancellation"
    );
}

#[test]
fn a_missing_binary_and_a_failing_one_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    let d = decoder(&dir.path().join("no-such-llama"), &model);
    let err = d
        .generate(&request(4), &mut |_: &str| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(matches!(err, DecoderError::BinaryNotFound { .. }), "{err}");
    assert!(err.to_string().contains("JEPA_DECODER_BIN"), "{err}");

    let bin = script(
        dir.path(),
        "broken",
        "echo 'error: failed to load model' >&2\nexit 3\n",
    );
    let err = decoder(&bin, &model)
        .generate(&request(4), &mut |_: &str| ControlFlow::Continue(()))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DecoderError::ProcessFailed { .. }), "{text}");
    assert!(text.contains("failed to load model"), "{text}");
    assert!(text.contains("exit status: 3"), "{text}");
}

/// llama.cpp's own llama-completion, where one is built.
fn real_binary() -> Option<PathBuf> {
    std::env::var_os("TOFY_TEST_LLAMA_COMPLETION")
        .map(PathBuf::from)
        .or_else(|| {
            let peer =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/bin/llama-completion");
            peer.is_file().then_some(peer)
        })
}

/// Not in `make test`: the binary is llama.cpp's own, built with the peers
/// (~16 min on 2 cores, more than the suite itself).
#[test]
#[ignore = "needs llama.cpp's llama-completion: ../shared/peers/build-llama-tools.sh (or TOFY_TEST_LLAMA_COMPLETION=PATH), then cargo test --release --test decoder_subprocess -- --ignored"]
fn the_real_llama_completion() {
    let bin = real_binary().expect(
        "no llama-completion at target/peers/bin or TOFY_TEST_LLAMA_COMPLETION: build the peers first",
    );
    let d = decoder(&bin, &common::smollm2());
    let (g, pieces) = collect(&d, &request(16));
    assert!(!g.text.trim().is_empty(), "{g:?}");
    assert!(!g.text.contains("[end of text]"), "{:?}", g.text);
    assert!(!g.text.contains("System:"), "no prompt echo: {:?}", g.text);
    assert_eq!(pieces.concat(), g.text);
    assert!(
        g.completion_tokens >= 1 && g.completion_tokens <= 16,
        "{g:?}"
    );
}

#[test]
fn a_silent_child_is_killed_on_cancel_and_long_prompts_pass() {
    let dir = tempfile::tempdir().unwrap();
    // Reads its prompt for a long time, printing nothing.
    let count = dir.path().join("count");
    let bin = script(
        dir.path(),
        "silent",
        &format!(
            "while [ \"$1\" != -f ]; do shift; done\nwc -c < \"$2\" > {}\nsleep 60\nprintf late\n",
            count.display()
        ),
    );
    let d = decoder(&bin, &dir.path().join("m.gguf"));
    // 1 MiB: far past what one argument may hold (128 KiB on Linux).
    let mut long = request(4);
    long.prompt = tofy::decoder::Prompt::text("x".repeat(1 << 20));
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    long.cancel = Some(cancel.clone());
    let setter = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let start = std::time::Instant::now();
    let g = d
        .generate(&long, &mut |_: &str| ControlFlow::Continue(()))
        .unwrap();
    setter.join().unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert!(g.text.is_empty(), "{g:?}");
    // A hang guard (the child sleeps 60 s), not a timing assertion.
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    let bytes: usize = std::fs::read_to_string(&count)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        bytes,
        (1 << 20) + 1,
        "the whole prompt, and the newline llama.cpp drops"
    );
}

#[test]
fn shutdown_kills_a_running_child_and_refuses_new_requests() {
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let bin = script(
        dir.path(),
        "silent",
        &format!("touch {}\nsleep 60\nprintf late\n", started.display()),
    );
    let d = decoder(&bin, &dir.path().join("m.gguf"));
    std::thread::scope(|scope| {
        let running =
            scope.spawn(|| d.generate(&request(4), &mut |_: &str| ControlFlow::Continue(())));
        // A hang guard, not a timing: the child has started.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !started.exists() {
            assert!(std::time::Instant::now() < deadline, "the child never ran");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Generous: the watcher looks every 50 ms; the child sleeps 60 s.
        d.shutdown(std::time::Duration::from_secs(20))
            .expect("the child is killed and reaped");
        let err = running.join().unwrap().unwrap_err();
        assert!(matches!(err, DecoderError::ShuttingDown), "{err}");
    });
    let err = d
        .generate(&request(4), &mut |_: &str| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(matches!(err, DecoderError::ShuttingDown), "{err}");
}
