//! Shared test helpers: random world-model checkpoints written with the
//! `safetensors` crate, and an independent float64 reference forward pass
//! written from ../shared/specs/world-checkpoint.md with plain loops; the
//! real decoder model and the one-error-line check for the CLI tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tofy::world::checkpoint::{self, TensorData};
use tofy::world::{WorldConfig, tokenize};

/// SplitMix64: a tiny deterministic generator, so tests need no RNG crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale).
    pub fn uniform(&mut self, scale: f64) -> f32 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((unit * 2.0 - 1.0) * scale) as f32
    }
}

/// A `WorldConfig` from its six sizes, in the seed's argument order.
pub fn config(
    dim: usize,
    num_layers: usize,
    num_heads: usize,
    max_seq: usize,
    vocab_size: usize,
    bridge_dim: usize,
) -> WorldConfig {
    WorldConfig {
        dim,
        num_layers,
        num_heads,
        max_seq,
        vocab_size,
        bridge_dim,
    }
}

/// Words every random vocab holds, so test prompts hit real ids.
pub const KNOWN_WORDS: &[&str] = &[
    "hello", "world", ",", "!", "it's", "5pm", "Hi", "gpu", "a", "short", "write", "é", "?", "the",
    "'",
];

/// A written checkpoint + vocab pair.
pub struct Written {
    pub model: PathBuf,
    pub vocab: PathBuf,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

/// Writes `model_world_test.safetensors` and `vocab_world.txt` under `dir`
/// for `cfg`, with random weights from `seed`. The vocab file has a duplicate
/// line and empty lines, which loaders must skip. With `metadata`, heads and
/// max_seq go into `__metadata__`.
pub fn write_checkpoint(dir: &Path, cfg: &WorldConfig, seed: u64, metadata: bool) -> Written {
    assert!(
        cfg.vocab_size >= 3 + KNOWN_WORDS.len(),
        "vocab too small for the known words"
    );
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::new();
    let mut data = Vec::new();
    for spec in cfg.tensor_specs() {
        let n: usize = spec.shape.iter().product();
        let fan_in = *spec.shape.last().unwrap() as f64;
        let values: Vec<f32> = if spec.name.contains(".ln") && spec.name.ends_with(".weight") {
            (0..n).map(|_| 1.0 + rng.uniform(0.2)).collect()
        } else if spec.name.ends_with(".bias") {
            (0..n).map(|_| rng.uniform(0.1)).collect()
        } else if spec.name.starts_with("encoder.embed") || spec.name.contains("action_embed") {
            (0..n).map(|_| rng.uniform(1.0)).collect()
        } else {
            (0..n).map(|_| rng.uniform(1.7 / fan_in.sqrt())).collect()
        };
        data.push((
            spec.name.clone(),
            TensorData::new(spec.shape.clone(), &values),
        ));
        tensors.insert(spec.name, (spec.shape, values));
    }
    let meta = metadata.then(|| cfg.metadata().into_iter().collect());
    let model = dir.join("model_world_test.safetensors");
    checkpoint::save(&model, &data, meta).unwrap();

    let mut lines: Vec<String> = ["<pad>", "<unk>", "<mask>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    lines.extend(KNOWN_WORDS.iter().map(|s| s.to_string()));
    lines.push(String::new());
    lines.push("hello".into()); // duplicate: keeps its first id
    let filler = cfg.vocab_size - 3 - KNOWN_WORDS.len();
    lines.extend((0..filler).map(|i| format!("tok{i}")));
    lines.push(String::new());
    let vocab = dir.join("vocab_world.txt");
    std::fs::write(&vocab, lines.join("\n") + "\n").unwrap();
    Written {
        model,
        vocab,
        tensors,
    }
}

/// Vocab ids the way the spec defines them, independently of the crate.
pub fn reference_ids(vocab_file: &Path, prompt: &str, max_seq: usize) -> Vec<usize> {
    let text = std::fs::read_to_string(vocab_file).unwrap();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for tok in ["<pad>", "<unk>", "<mask>"].into_iter().chain(text.lines()) {
        let tok = tok.trim_end_matches('\r');
        if !tok.is_empty() && !ids.contains_key(tok) {
            let next = ids.len();
            ids.insert(tok.to_string(), next);
        }
    }
    tokenize(prompt)
        .iter()
        .take(max_seq)
        .map(|t| ids.get(*t).copied().unwrap_or(1))
        .collect()
}

/// The forward pass in float64 with plain loops, straight from the spec.
pub fn reference_forward(
    t: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: &WorldConfig,
    ids: &[usize],
) -> Vec<f64> {
    reference_pass(t, cfg, ids, true)
}

/// `bridge(encoder(ids))`: the reference pass without the transition.
#[allow(dead_code)] // not every test binary uses it
pub fn reference_bridge_of_latent(
    t: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: &WorldConfig,
    ids: &[usize],
) -> Vec<f64> {
    reference_pass(t, cfg, ids, false)
}

fn reference_pass(
    t: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: &WorldConfig,
    ids: &[usize],
    transition: bool,
) -> Vec<f64> {
    let w = |name: &str| -> Vec<f64> { t[name].1.iter().map(|&v| f64::from(v)).collect() };
    let (d, seq) = (cfg.dim, cfg.max_seq);
    let len = ids.len().min(seq);
    let emb = w("encoder.embed.weight");
    let mut x = vec![vec![0.0f64; d]; seq];
    for (pos, row) in x.iter_mut().enumerate() {
        let id = if pos < len { ids[pos] } else { 0 };
        for (j, v) in row.iter_mut().enumerate() {
            let angle = pos as f64 / 10000f64.powf((j - j % 2) as f64 / d as f64);
            let pe = if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
            *v = emb[id * d + j] + f64::from(pe);
        }
    }
    let linear = |name: &str, input: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let (wt, b) = (w(&format!("{name}.weight")), w(&format!("{name}.bias")));
        let (out, inp) = (b.len(), input[0].len());
        input
            .iter()
            .map(|row| {
                (0..out)
                    .map(|o| b[o] + (0..inp).map(|i| row[i] * wt[o * inp + i]).sum::<f64>())
                    .collect()
            })
            .collect()
    };
    let layer_norm = |name: &str, input: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let (g, b) = (w(&format!("{name}.weight")), w(&format!("{name}.bias")));
        input
            .iter()
            .map(|row| {
                let mean = row.iter().sum::<f64>() / row.len() as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / row.len() as f64;
                row.iter()
                    .enumerate()
                    .map(|(j, v)| (v - mean) / (var + 1e-5).sqrt() * g[j] + b[j])
                    .collect()
            })
            .collect()
    };
    let hd = d / cfg.num_heads;
    for l in 0..cfg.num_layers {
        let b = format!("encoder.block_{l}");
        let h = layer_norm(&format!("{b}.ln1"), &x);
        let q = linear(&format!("{b}.attn.q_proj"), &h);
        let k = linear(&format!("{b}.attn.k_proj"), &h);
        let v = linear(&format!("{b}.attn.v_proj"), &h);
        let mut ctx = vec![vec![0.0; d]; seq];
        for head in 0..cfg.num_heads {
            let cols = head * hd..(head + 1) * hd;
            for i in 0..seq {
                let scores: Vec<f64> = (0..seq)
                    .map(|j| {
                        cols.clone().map(|c| q[i][c] * k[j][c]).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for c in cols.clone() {
                    ctx[i][c] = (0..seq).map(|j| exps[j] / sum * v[j][c]).sum();
                }
            }
        }
        let attn = linear(&format!("{b}.attn.out_proj"), &ctx);
        for (xr, ar) in x.iter_mut().zip(&attn) {
            xr.iter_mut().zip(ar).for_each(|(a, b)| *a += b);
        }
        let mut f = linear(&format!("{b}.ff1"), &layer_norm(&format!("{b}.ln2"), &x));
        for v in f.iter_mut().flatten() {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            *v = 0.5 * *v * (1.0 + (c * (*v + 0.044715 * v.powi(3))).tanh());
        }
        let f = linear(&format!("{b}.ff2"), &f);
        for (xr, fr) in x.iter_mut().zip(&f) {
            xr.iter_mut().zip(fr).for_each(|(a, b)| *a += b);
        }
    }
    let x = layer_norm("encoder.ln_final", &x);
    let mut z: Vec<f64> = (0..d)
        .map(|j| x[..len].iter().map(|r| r[j]).sum::<f64>() / len as f64)
        .collect();
    if !transition {
        return linear("decoder_bridge.proj", &[z]).remove(0);
    }
    z.extend(w("world_transition.action_embed.weight"));
    let mut hidden = linear("world_transition.fc1", &[z]);
    hidden[0].iter_mut().for_each(|v| *v = v.max(0.0));
    let next = linear("world_transition.fc2", &hidden);
    linear("decoder_bridge.proj", &next).remove(0)
}

/// max |got - want| / max |want|: the error relative to the vector's scale,
/// which stays meaningful for entries near zero.
pub fn max_relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "vector lengths differ");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, w)| m.max((f64::from(g) - w).abs()));
    err / scale
}

/// Path to the committed seed-format fixture.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed-tiny")
}

/// The real default decoder model, fetched by `make test` (scripts/fetch-gguf.sh).
/// `TOFY_TEST_GGUF` points the tests at another GGUF.
pub fn smollm2() -> PathBuf {
    let path = std::env::var_os("TOFY_TEST_GGUF").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} is missing: run `make models` (scripts/fetch-gguf.sh) before the tests",
        path.display()
    );
    path
}

/// `status`, once checked to be an exit: a process that died by a signal
/// (a crash, an abort) fails the test, whatever the test expected.
pub fn no_signal(status: std::process::ExitStatus, what: &str) -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.signal().is_none(),
        "{what} died by a signal ({status}{})",
        if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        }
    );
    status
}

/// Waits for `child` to exit (at most two minutes: a hang guard, not a
/// timing) and checks that it exited rather than died by a signal.
pub fn exit_status(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return no_signal(status, what);
        }
        assert!(std::time::Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends `signal` to `child`.
pub fn signal(child: &std::process::Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// A failing command's single stderr line (which must start with `error: `);
/// nothing may have been printed on stdout.
pub fn fails(out: std::process::Output) -> String {
    no_signal(out.status, "the command");
    assert!(
        !out.status.success(),
        "expected failure, got stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one error line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

/// Runs `request` on `decoder`, returning the result and the streamed pieces.
pub fn generate_collecting(
    decoder: &dyn tofy::decoder::Decoder,
    request: &tofy::decoder::GenerateRequest,
) -> (tofy::decoder::Generation, Vec<String>) {
    let mut pieces = Vec::new();
    let generation = decoder
        .generate(request, &mut |p: &str| {
            pieces.push(p.to_string());
            std::ops::ControlFlow::Continue(())
        })
        .expect("generate");
    (generation, pieces)
}

/// A sink that takes `n` pieces and asks to stop at the n-th.
pub fn cancel_after(n: usize) -> impl FnMut(&str) -> std::ops::ControlFlow<()> {
    let mut seen = 0;
    move |_| {
        seen += 1;
        if seen >= n {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    }
}

/// A control map of fixed values for SmolLM2 (layers 10-20, output norm
/// 30), as `tofy fit-control` writes one: for plumbing tests, not fitted.
#[allow(dead_code)] // not every test binary uses it
pub fn write_control_map(path: &std::path::Path) {
    let weight: Vec<f32> = (0..576 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    tofy::projector::Projector::from_parts(
        weight,
        vec![0.0; 576],
        1,
        576,
        256,
        Some(30.0),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "test".into(),
    )
    .with_control_layers(10, 20)
    .save(path, "test control map")
    .unwrap();
}
