//! The `cuda` build on a machine without a GPU (this dev machine, CI-like
//! runners): it starts, says once why the GPU goes unused, and serves from
//! the CPU (ignored by default, as they cannot pass where a driver is:
//! `make cuda` runs them with `--include-ignored` where none is); and the
//! world-model kernels compile through NVRTC (a failure where libnvrtc is
//! absent). `make cuda` runs these with the PyPI toolkit's
//! libraries (cuBLAS, NVRTC, cudart, never a libcuda stub) on the library
//! path. What needs a GPU is `scripts/gpu-check.sh`'s.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::smollm2;
use tofy::world::cuda::{self, compile};

/// `tofy` in the repository root with a clean decoder environment.
fn tofy(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tofy"));
    cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("JEPA_DECODER_") || key.starts_with("TOFY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("JEPA_DECODER_THREADS", "1");
    cmd.envs(env.iter().copied());
    cmd.output().expect("run tofy")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The notices about devices (not, say, the one about a reply cut at --max-new-tokens).
fn notes(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("note:") && (l.contains("GPU") || l.contains("CPU")))
        .map(str::to_string)
        .collect()
}

/// Why the no-driver tests are ignored by default: where a driver is
/// present (the machines `--features cuda` is for) they cannot pass, and a
/// skip must read as one. `make cuda` runs them with `--include-ignored`
/// on a machine without a driver (scripts/build-cuda.sh).
const NO_DRIVER: &str = "for a machine without an NVIDIA driver: make cuda runs it there with --include-ignored (scripts/gpu-check.sh covers a GPU)";

/// Fails, rather than passes, on a machine with a driver.
fn assert_no_driver() {
    assert!(
        !cuda::driver_present(),
        "an NVIDIA driver is present: this test is {NO_DRIVER}"
    );
}

#[test]
#[ignore = "no NVIDIA driver: make cuda runs it with --include-ignored where there is none"]
fn without_a_driver_the_cuda_build_serves_from_the_cpu_after_one_notice() {
    assert_no_driver();
    let model = smollm2().display().to_string();
    let prompt = "write a short gpu recommendation";
    let run = |extra: &[&str], ngl: &str| {
        let args = [&["infer-agent", prompt, "--max-new-tokens", "12"], extra].concat();
        tofy(
            &args,
            &[
                ("JEPA_DECODER_MODEL", model.as_str()),
                ("JEPA_DECODER_NGL", ngl),
                ("JEPA_DECODER_SEED", "7"),
            ],
        )
    };
    // The seed's defaults: 99 GPU layers, the device chosen automatically.
    let auto = run(&[], "99");
    assert!(auto.status.success(), "{}", text(&auto.stderr));
    let reply = text(&auto.stdout);
    assert!(reply.trim().len() > 3, "{reply:?}");
    let said = notes(&auto);
    assert_eq!(said.len(), 1, "exactly one notice: {said:?}");
    for part in [
        "no usable GPU",
        "no NVIDIA driver",
        "JEPA_DECODER_NGL=99 ignored",
        "the world model run on the CPU",
    ] {
        assert!(said[0].contains(part), "{part:?} in {:?}", said[0]);
    }

    // The CPU asked for by name: no notice, and the very same reply.
    let cpu = run(&["--device", "cpu"], "0");
    assert!(cpu.status.success(), "{}", text(&cpu.stderr));
    assert_eq!(notes(&cpu), Vec::<String>::new());
    assert_eq!(text(&cpu.stdout), reply);
}

#[test]
#[ignore = "no NVIDIA driver: make cuda runs it with --include-ignored where there is none"]
fn without_a_driver_asking_for_the_gpu_is_one_error_line() {
    assert_no_driver();
    for device in ["cuda", "cuda:1"] {
        let out = tofy(&["condition", "--device", device, "hello there"], &[]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error:") && stderr.contains("no NVIDIA driver"),
            "{stderr}"
        );
    }
    // A device that is not one is refused by the argument parser, also in one line.
    let out = tofy(&["condition", "--device", "tpu", "hello"], &[]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(stderr.contains("expected cpu, cuda"), "{stderr}");

    // The automatic choice: the CPU's vector, with one notice.
    let auto = tofy(&["condition", "--json", "hello there"], &[]);
    let cpu = tofy(
        &["condition", "--json", "--device", "cpu", "hello there"],
        &[],
    );
    assert!(auto.status.success(), "{}", text(&auto.stderr));
    assert_eq!(text(&auto.stdout), text(&cpu.stdout));
    assert_eq!(notes(&auto).len(), 1, "{}", text(&auto.stderr));
    assert!(notes(&cpu).is_empty(), "{}", text(&cpu.stderr));
}

#[test]
#[ignore = "no NVIDIA driver: make cuda runs it with --include-ignored where there is none"]
fn doctor_says_what_the_gpu_side_lacks() {
    assert_no_driver();
    let out = tofy(&["doctor"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    for line in [
        "GPU:           none usable: no NVIDIA driver",
        "llama.cpp CUDA: libggml-cuda.so does not load: ",
        "ggml devices:  CPU (",
        "on the CPU: CUDA: no NVIDIA driver",
    ] {
        assert!(report.contains(line), "{line:?} in:\n{report}");
    }
    // The loader's reason names the library that is missing; doctor passes it on.
    let module = report
        .lines()
        .find(|l| l.starts_with("llama.cpp CUDA:"))
        .unwrap();
    assert!(
        ["libcuda.so.1", "libcudart.so.13", "libcublas.so.13"]
            .iter()
            .any(|lib| module.contains(lib)),
        "{module}"
    );
}

#[test]
fn the_world_kernels_compile_through_nvrtc() {
    assert!(
        compile::nvrtc_present(),
        "libnvrtc.so.13 not found: run this through make cuda, which puts the PyPI NVRTC on LD_LIBRARY_PATH"
    );
    let (major, _) = compile::nvrtc_version().unwrap();
    assert!(major >= 12, "NVRTC {major}");
    // Turing, Ampere and Hopper: the kernels use nothing newer than warp shuffles.
    for arch in ["compute_75", "compute_80", "compute_90"] {
        let ptx = compile::compile(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let ptx = ptx.to_src();
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(ptx.contains(&target), "{arch}: no {target}");
        for kernel in compile::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {kernel}(")),
                "{arch}: kernel {kernel} missing from the PTX"
            );
        }
    }

    // The cache: the first call compiles and writes, the second reads the file.
    let dir = tempfile::tempdir().unwrap();
    let first = compile::ptx_cached(Some(dir.path()), 9, 0)
        .unwrap()
        .to_src();
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one cached PTX file");
    let path = files[0].path();
    assert!(
        path.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("world-compute_90-"),
        "{path:?}"
    );
    std::fs::write(&path, format!("{first}// read back from the cache\n")).unwrap();
    let second = compile::ptx_cached(Some(dir.path()), 9, 0)
        .unwrap()
        .to_src();
    assert!(second.ends_with("// read back from the cache\n"));
}
