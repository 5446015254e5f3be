//! `tofy eval-conditioning` on the real SmolLM2 GGUF: every mode and every
//! paired difference is reported, the NLLs are what the decoder's own
//! `score` gives for the same prompts, and the per-pair file adds up to the
//! report.

mod common;

use std::process::Command;

use tofy::data::pairs::{self, Pair};
use tofy::decoder::llama::LlamaDecoder;
use tofy::decoder::{ChatMessage, Decoder, DecoderConfig, Role, ScoreRequest};
use tofy::engine::{CondSettings, Engine, Steer};
use tofy::eval_conditioning::{EvalMode, PAIRED, instruction_prompt};
use tofy::projector::Projector;
use tofy::world::{LoadOptions, WorldModel};

const PAIRS: [(&str, &str); 8] = [
    ("hi how are you today", "i am good thanks, and you?"),
    ("what do you do for work", "i teach math at a high school"),
    ("do you like dogs", "yes i have two of them"),
    ("where are you from", "i grew up in ohio"),
    ("what is your favorite food", "pizza, for sure"),
    (
        "any plans for the weekend",
        "going hiking if it does not rain",
    ),
    ("have you seen any good movies", "not lately, i mostly read"),
    ("how was your day", "long, but it ended well"),
];

/// The eight pairs, written as `dir/pairs.tsv`.
fn write_pairs(dir: &std::path::Path) -> (std::path::PathBuf, Vec<Pair>) {
    let path = dir.join("pairs.tsv");
    let pairs: Vec<Pair> = PAIRS
        .iter()
        .map(|(c, n)| Pair {
            context: c.to_string(),
            next: n.to_string(),
        })
        .collect();
    pairs::write(&path, &pairs).unwrap();
    (path, pairs)
}

fn nll_of(decoder: &dyn Decoder, request: &ScoreRequest) -> (f64, usize) {
    let s = decoder.score(request).unwrap();
    (-s.logprobs.iter().sum::<f64>(), s.tokens.len())
}

#[test]
fn every_mode_is_reported_and_equals_the_decoders_own_score() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pairs) = write_pairs(dir.path());
    // A control map fitted on the same pairs (a plumbing check, not a
    // measurement), for the cvec modes.
    let map = dir.path().join("control.safetensors");
    let fit = Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args([
            "fit-control",
            path.to_str().unwrap(),
            "--out",
            map.to_str().unwrap(),
        ])
        .args(["--layers", "8-12", "--ridge", "1"])
        .env("JEPA_DECODER_MODEL", common::smollm2())
        .env("JEPA_DECODER_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        fit.status.success(),
        "{}",
        String::from_utf8_lossy(&fit.stderr)
    );
    let control = Projector::load(&map).unwrap();
    assert_eq!(control.control_layers(), Some((8, 12)));
    assert_eq!((control.k(), control.n_embd()), (1, 576));
    // A soft prompt: the weight 0, the bias the embedded projector's rows
    // of the first context's vector (before their rescaling), so that
    // every pair gets the rows `prefix` gives the first pair.
    let world = WorldModel::load_default(&LoadOptions::default()).unwrap();
    let first = world.condition(PAIRS[0].0).unwrap().vector;
    let projector = Projector::embedded();
    let (weight, bias) = projector.parameters();
    let constant: Vec<f32> = bias
        .iter()
        .enumerate()
        .map(|(r, b)| {
            let w = &weight[r * projector.bridge_dim()..(r + 1) * projector.bridge_dim()];
            b + w.iter().zip(&first).map(|(a, z)| a * z).sum::<f32>()
        })
        .collect();
    let soft = Projector::from_parts(
        vec![0.0; weight.len()],
        constant,
        projector.k(),
        projector.n_embd(),
        projector.bridge_dim(),
        projector.row_norm(),
        projector.gguf_name(),
        "soft".into(),
    );
    let soft_file = dir.path().join("soft.safetensors");
    soft.save(&soft_file, "test soft prompt").unwrap();
    // The embedded projector as the oracle projector: then `oracle` scores
    // exactly what `oracle_prefix` does.
    let oracle_file = dir.path().join("oracle.safetensors");
    projector
        .save(&oracle_file, "test oracle projector")
        .unwrap();
    let per_pair = dir.path().join("per-pair.tsv");
    let out = Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(["eval-conditioning", path.to_str().unwrap(), "--n", "8"])
        .args(["--json", "--parallel", "2", "--resamples", "200"])
        .args(["--soft-prompt", soft_file.to_str().unwrap()])
        .args(["--oracle-projector", oracle_file.to_str().unwrap()])
        .args(["--per-pair", per_pair.to_str().unwrap()])
        .args([
            "--control",
            map.to_str().unwrap(),
            "--control-strength",
            "4",
        ])
        .env("JEPA_DECODER_MODEL", common::smollm2())
        .env("JEPA_DECODER_THREADS", "1")
        .env("JEPA_DECODER_NGL", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["n"], 8);
    // No sidecar: the conversations are inferred from the order, and no two
    // of these pairs chain.
    assert_eq!(report["bootstrap"], "conversations");
    assert_eq!(report["conversations"], 8);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no conversation sidecar"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in EvalMode::ALL {
        let nll = report["modes"][mode.name()]["nll"].as_f64().unwrap();
        assert!(nll > 0.0 && nll.is_finite(), "{mode:?}: {nll}");
    }
    for (a, b) in PAIRED {
        let d = &report["paired"][format!("{}-{}", a.name(), b.name())];
        let (lo, mean, hi) = (
            d["lo"].as_f64().unwrap(),
            d["mean"].as_f64().unwrap(),
            d["hi"].as_f64().unwrap(),
        );
        assert!(lo <= mean && mean <= hi, "{a:?}-{b:?}: {d}");
    }

    // The per-pair file: a line per pair and mode, adding up to the report.
    let lines: Vec<Vec<String>> = std::fs::read_to_string(&per_pair)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    assert_eq!(lines[0], ["pair", "conversation", "mode", "nll", "tokens"]);
    assert_eq!(lines.len(), 1 + 8 * EvalMode::ALL.len());
    for mode in EvalMode::ALL {
        let rows: Vec<&Vec<String>> = lines[1..].iter().filter(|l| l[2] == mode.name()).collect();
        assert_eq!(rows.len(), 8, "{mode:?}");
        let nll: f64 = rows.iter().map(|l| l[3].parse::<f64>().unwrap()).sum();
        let tokens: usize = rows.iter().map(|l| l[4].parse::<usize>().unwrap()).sum();
        let reported = report["modes"][mode.name()]["nll"].as_f64().unwrap();
        assert!((nll / tokens as f64 - reported).abs() < 1e-5, "{mode:?}");
    }

    // The same NLLs, scored directly: no message, the instruction alone,
    // the projector's rows of each context's own world vector, and the
    // soft prompt's rows (those of the first context's vector).
    let vectors: Vec<Vec<f32>> = PAIRS
        .iter()
        .map(|(c, _)| world.condition(c).unwrap().vector)
        .collect();
    let replies: Vec<&str> = PAIRS.iter().map(|(_, r)| *r).collect();
    let oracles: Vec<Vec<f32>> = world
        .encode_as_conditioning(&replies)
        .unwrap()
        .into_iter()
        .map(|c| c.vector)
        .collect();
    let config = DecoderConfig {
        ctx: 1024,
        threads: 1,
        ngl: 0,
        ..DecoderConfig::default()
    };
    let decoder = LlamaDecoder::load(&common::smollm2(), &config).unwrap();
    let eot = decoder.end_of_turn().unwrap();
    assert_eq!(eot, "<|im_end|>");
    let engine = Engine::new(world, Box::new(decoder), CondSettings::default(), None).unwrap();
    let projector = Projector::embedded();
    let (mut none, mut prefix, mut oracle, mut cvec, mut tokens) = (0.0, 0.0, 0.0, 0.0, 0);
    let (mut instruction, mut soft_prompt) = (0.0, 0.0);
    for (((context, reply), vector), reply_vector) in PAIRS.iter().zip(&vectors).zip(&oracles) {
        let steered = |prompt, control| ScoreRequest {
            prompt,
            continuation: format!("{reply}{eot}"),
            cancel: None,
            control,
        };
        let request = |prompt| steered(prompt, None);
        let user = vec![ChatMessage::new(Role::User, *context)];
        let (n, t) = nll_of(
            engine.decoder(),
            &request(tofy::decoder::Prompt::chat(user.clone())),
        );
        let rows_of = |v: &[f32]| Steer {
            mode: tofy::conditioning::CondMode::Prefix,
            format: Default::default(),
            conditioning: None,
            rows: Some(projector.project(v).unwrap()),
            control: None,
            world_time: Default::default(),
        };
        let (p, _) = nll_of(
            engine.decoder(),
            &request(engine.apply(&rows_of(vector), user.clone())),
        );
        let (o, _) = nll_of(
            engine.decoder(),
            &request(engine.apply(&rows_of(reply_vector), user.clone())),
        );
        let (s, _) = nll_of(
            engine.decoder(),
            &request(engine.apply(&rows_of(&vectors[0]), user.clone())),
        );
        let pair = Pair {
            context: context.to_string(),
            next: reply.to_string(),
        };
        let (i, _) = nll_of(engine.decoder(), &request(instruction_prompt(&pair)));
        // The instruction's tokens are the prefix prompt's, rows taken out.
        let without_rows: Vec<i32> = engine
            .decoder()
            .layout(&engine.apply(&rows_of(vector), user.clone()))
            .unwrap()
            .into_iter()
            .flat_map(|segment| match segment {
                tofy::decoder::Segment::Tokens(t) => t,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            engine
                .decoder()
                .prompt_tokens(&instruction_prompt(&pair))
                .unwrap(),
            without_rows
        );
        instruction += i;
        soft_prompt += s;
        let (c, _) = nll_of(
            engine.decoder(),
            &steered(
                tofy::decoder::Prompt::chat(user.clone()),
                Some(control.control(vector, 4.0).unwrap()),
            ),
        );
        none += n;
        prefix += p;
        oracle += o;
        cvec += c;
        tokens += t;
    }
    let got = |mode: &str| report["modes"][mode]["nll"].as_f64().unwrap();
    assert_eq!(report["modes"]["none"]["tokens"], tokens);
    assert!((got("none") - none / tokens as f64).abs() < 1e-9);
    assert!((got("prefix") - prefix / tokens as f64).abs() < 1e-9);
    assert!((got("oracle_prefix") - oracle / tokens as f64).abs() < 1e-9);
    assert!((got("cvec") - cvec / tokens as f64).abs() < 1e-9);
    assert!((got("instruction") - instruction / tokens as f64).abs() < 1e-9);
    assert!((got("soft_prompt") - soft_prompt / tokens as f64).abs() < 1e-9);
    assert!((got("oracle") - oracle / tokens as f64).abs() < 1e-9);
    assert_ne!(got("mismatched_oracle"), got("oracle"));
    // The fraction of the capacity reached, from the same sums; none when
    // the oracle does not beat the soft prompt.
    if got("oracle") < got("soft_prompt") {
        let capacity = report["capacity_reached"]["mean"].as_f64().unwrap();
        let want = (got("soft_prompt") - got("prefix")) / (got("soft_prompt") - got("oracle"));
        assert!((capacity - want).abs() < 1e-9, "{capacity} vs {want}");
    } else {
        assert!(report["capacity_reached"].is_null(), "{report}");
    }
    assert!(
        (got("cvec") - got("none")).abs() > 1e-4,
        "the vector changes the scores"
    );

    // --modes scores only those, and reports only the differences of two
    // scored modes; --skip 6 takes the last two pairs of the seed's draw.
    let fresh = dir.path().join("fresh.tsv");
    let out = Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(["eval-conditioning", path.to_str().unwrap(), "--n", "2"])
        .args(["--skip", "6", "--per-pair", fresh.to_str().unwrap()])
        .args([
            "--json",
            "--resamples",
            "100",
            "--modes",
            "oracle_prefix,none",
        ])
        .env("JEPA_DECODER_MODEL", common::smollm2())
        .env("JEPA_DECODER_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let small: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&small["modes"]), ["none", "oracle_prefix"]);
    assert_eq!(keys(&small["paired"]), ["oracle_prefix-none"]);
    let order = |file: &std::path::Path| {
        let mut seen: Vec<String> = Vec::new();
        for line in std::fs::read_to_string(file).unwrap().lines().skip(1) {
            let pair = line.split('\t').next().unwrap().to_string();
            if !seen.contains(&pair) {
                seen.push(pair);
            }
        }
        seen
    };
    assert_eq!(order(&fresh), order(&per_pair)[6..]);

    // --world-contexts: the world model reads a twin file's contexts. The
    // pairs file as its own twin changes nothing; other contexts change the
    // prefix rows, not the decoder's prompt around them (`none`).
    let prefix_with = |twin: Option<&std::path::Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tofy"));
        command
            .args(["eval-conditioning", path.to_str().unwrap(), "--n", "2"])
            .args(["--json", "--resamples", "100", "--modes", "prefix,none"])
            .env("JEPA_DECODER_MODEL", common::smollm2())
            .env("JEPA_DECODER_THREADS", "1");
        if let Some(twin) = twin {
            command.arg("--world-contexts").arg(twin);
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let nll = |m: &str| report["modes"][m]["nll"].as_f64().unwrap();
        (nll("prefix"), nll("none"))
    };
    let history = dir.path().join("pairs.history.tsv");
    let longer: Vec<Pair> = pairs
        .iter()
        .map(|p| Pair {
            context: format!("i love old movies | {}", p.context),
            next: p.next.clone(),
        })
        .collect();
    pairs::write(&history, &longer).unwrap();
    let plain = prefix_with(None);
    assert_eq!(prefix_with(Some(&path)), plain);
    let (prefix, none) = prefix_with(Some(&history));
    assert_eq!(none, plain.1);
    assert_ne!(prefix, plain.0);
    // Bad invocations: one clear line each, before any scoring.
    let failure = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tofy"))
            .arg("eval-conditioning")
            .args(args)
            .env("JEPA_DECODER_MODEL", common::smollm2())
            .env("JEPA_DECODER_THREADS", "1")
            .output()
            .unwrap();
        common::fails(out)
    };
    let pairs_file = path.to_str().unwrap();
    // A twin with other replies.
    pairs::write(&history, &longer[1..]).unwrap();
    let twin = history.to_str().unwrap();
    let line = failure(&[pairs_file, "--n", "2", "--world-contexts", twin]);
    assert!(
        line.contains("7 pairs where the pairs file has 8"),
        "{line}"
    );
    // A mode without the file it needs names the option.
    for (modes, option) in [
        ("soft_prompt,none", "--soft-prompt FILE"),
        ("oracle,none", "--oracle-projector FILE"),
    ] {
        let line = failure(&[pairs_file, "--n", "2", "--modes", modes]);
        assert!(line.contains(option), "{line}");
    }
    // Fewer than two pairs cannot be mismatched.
    let one = dir.path().join("one.tsv");
    pairs::write(&one, &pairs[..1]).unwrap();
    let line = failure(&[one.to_str().unwrap()]);
    assert!(line.contains("at least 2 pairs"), "{line}");
}

#[test]
fn fit_projector_writes_a_projector_the_engine_takes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_pairs(dir.path());
    let out_file = dir.path().join("fitted.safetensors");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tofy"))
            .args(["fit-projector", path.to_str().unwrap()])
            .args(["--out", out_file.to_str().unwrap()])
            .args(extra)
            .env("JEPA_DECODER_MODEL", common::smollm2())
            .env("JEPA_DECODER_THREADS", "1")
            .output()
            .unwrap()
    };
    let out = run(&["--k", "2", "--ridge", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = Projector::load(&out_file).unwrap();
    assert_eq!((p.k(), p.n_embd(), p.bridge_dim()), (2, 576, 256));
    assert_eq!(p.gguf_name(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    // Different contexts get different rows, each at the token-row norm.
    let world = WorldModel::load_default(&LoadOptions::default()).unwrap();
    let a = p
        .project(&world.condition(PAIRS[0].0).unwrap().vector)
        .unwrap();
    let b = p
        .project(&world.condition(PAIRS[1].0).unwrap().vector)
        .unwrap();
    assert_ne!(a, b);
    let norm = a.row(0).iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 3.1539).abs() < 1e-3, "{norm}");

    let line = common::fails(run(&["--ridge", "-1"]));
    assert!(line.contains("--ridge must be"), "{line}");
}
