//! Training (feature `train`): candle vs ndarray forward, a short real
//! training run, reloading what it wrote, `--init-encoder`, the chitchat
//! converter, eval-world, and the trainer's bad-input errors.
#![cfg(feature = "train")]

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use common::{config, max_relative_error, write_checkpoint};
use tofy::data::pairs::{self, Pair};
use tofy::train::model::{load_checkpoint, pad_ids};
use tofy::train::{TrainConfig, TrainReport, train};
use tofy::world::{Checkpoint, LoadOptions, WorldModel};

#[test]
fn candle_forward_matches_ndarray_forward() {
    let prompts = [
        "hello world",
        "Hi, it's 5pm!",
        "write a short gpu recommendation, é?",
        "tok3 tok4 tok5 tok6 tok7 tok8 tok9 tok10 tok11 tok12 tok13 tok14 tok15 tok16 tok17 tok18 tok19",
    ];
    for cfg in [
        config(64, 2, 8, 32, 40, 256),
        config(48, 3, 6, 16, 50, 24),
        config(96, 1, 12, 8, 64, 100),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let w = write_checkpoint(dir.path(), &cfg, 21, true);
        let model = WorldModel::load(&w.model, &w.vocab, &LoadOptions::default()).unwrap();
        let encoded = model.encode(&prompts).unwrap();
        let ids: Vec<&[u32]> = encoded.iter().map(|e| e.ids.as_slice()).collect();
        let lens: Vec<usize> = ids.iter().map(|i| i.len()).collect();
        let candle = load_checkpoint(&w.model, &cfg).unwrap();
        let got = candle
            .forward(&pad_ids(&ids, cfg.max_seq, &Device::Cpu).unwrap(), &lens)
            .unwrap();
        let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
        let ours = model.condition_batch(&prompts).unwrap();
        for ((c, o), p) in got.iter().zip(&ours).zip(prompts) {
            let want: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
            let err = max_relative_error(&o.vector, &want);
            assert!(
                err <= 1e-5,
                "{cfg:?} {p:?}: ndarray vs candle max relative error {err:e}"
            );
        }
    }
}

/// A small corpus with structure to learn: the reply to a greeting is a
/// greeting, to a question about food an answer about food, and so on.
fn tiny_corpus(dir: &Path) -> std::path::PathBuf {
    let topics = [
        ("hello there how are you", "i am fine thanks and you"),
        ("what did you eat today", "i had pasta and a salad"),
        ("do you like football", "yes i watch every game"),
        ("where do you live", "i live in a small town"),
        ("what music do you like", "mostly jazz and some rock"),
    ];
    let pairs: Vec<Pair> = (0..200)
        .map(|i| {
            let (c, n) = topics[i % topics.len()];
            Pair {
                context: format!("{c} {}", i % 7),
                next: format!("{n} {}", i % 3),
            }
        })
        .collect();
    let path = dir.join("pairs.tsv");
    pairs::write(&path, &pairs).unwrap();
    path
}

fn tiny_config(pairs: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        pairs: pairs.to_path_buf(),
        steps: 40,
        batch: 16,
        dim: 32,
        max_seq: 16,
        num_layers: 1,
        num_heads: 4,
        max_vocab: 100,
        bridge_dim: 16,
        lr: 3e-3,
        weight_decay: 0.01,
        var_weight: 1.0,
        cov_weight: 0.04,
        nce_weight: 1.0,
        embed_lr_scale: 10.0,
        init_encoder: None,
        heldout: None,
        seed: 5,
        out: out.to_path_buf(),
        log_every: 10,
        checkpoint_every: 0,
        stop_after: None,
        cancel: None,
        progress: false,
    }
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let ckpt = Checkpoint::open(path).unwrap();
    let mut names = ckpt.names();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let shape = ckpt.shape(&n).unwrap().to_vec();
            let values = match *shape.as_slice() {
                [r, c] => ckpt.matrix(&n, r, c).unwrap().into_raw_vec_and_offset().0,
                [l] => ckpt.vector(&n, l).unwrap().to_vec(),
                _ => unreachable!(),
            };
            (n, values)
        })
        .collect()
}

/// Largest absolute difference between two tensors' values.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Largest absolute difference between two runs' values of `name`.
fn max_change(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)], name: &str) -> f32 {
    let values = |run: &'static str, of: &[(String, Vec<f32>)]| {
        of.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{run} run has no {name}"))
            .1
            .clone()
    };
    max_abs_diff(&values("first", a), &values("second", b))
}

#[test]
fn the_token_embeddings_train_at_their_own_rate() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let run = |steps: usize, lr: f64, embed_lr_scale: f64, out: &str| {
        let cfg = TrainConfig {
            steps,
            lr,
            embed_lr_scale,
            ..tiny_config(&corpus, &dir.path().join(out))
        };
        tensors(&train(&cfg).unwrap().model_path)
    };
    let initial = run(1, 1e-9, 1.0, "init");
    let frozen = run(5, 3e-3, 0.0, "frozen");
    let (slow, fast) = (run(5, 3e-3, 1.0, "slow"), run(5, 3e-3, 10.0, "fast"));
    let embed = "encoder.embed.weight";
    assert!(
        max_change(&frozen, &initial, embed) < 1e-6,
        "scale 0 freezes the embeddings"
    );
    assert!(max_change(&frozen, &initial, "encoder.block_0.ff1.weight") > 1e-4);
    let (moved_slow, moved_fast) = (
        max_change(&slow, &initial, embed),
        max_change(&fast, &initial, embed),
    );
    assert!(
        moved_fast > 5.0 * moved_slow,
        "embeddings moved {moved_slow:e} at 1×, {moved_fast:e} at 10×"
    );
}

#[test]
fn training_lowers_the_loss_trains_every_layer_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let out = dir.path().join("out");
    let cfg = tiny_config(&corpus, &out);
    let report: TrainReport = train(&cfg).unwrap();
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    let (first, last) = (mean(&report.losses[..5]), mean(&report.losses[35..]));
    assert!(last < first * 0.8, "loss {first} -> {last}");
    assert_eq!(report.log.len(), 4, "a log line every 10 steps");

    // Every trained tensor moved away from its initial value (a fused op
    // without a backward pass once silently froze the whole encoder).
    let trained = tensors(&report.model_path);
    let mut one_step = cfg.clone();
    one_step.steps = 1;
    one_step.lr = 1e-9;
    one_step.out = dir.path().join("init");
    let initial = tensors(&train(&one_step).unwrap().model_path);
    for ((name, t), (_, i)) in trained.iter().zip(&initial) {
        let moved = max_abs_diff(t, i);
        if name.starts_with("decoder_bridge") {
            assert!(
                moved < 1e-6,
                "{name}: the bridge is not trained by this recipe"
            );
        } else {
            assert!(moved > 1e-4, "{name} did not train (max change {moved:e})");
        }
    }

    // The written files load in the inference path with no size arguments.
    let model = WorldModel::load(
        &report.model_path,
        &report.vocab_path,
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(model.config(), &report.config);
    assert_eq!(model.config().max_seq, 16);
    assert_eq!(model.config().num_heads, 4);
    let v = model.condition("hello there how are you").unwrap();
    assert_eq!(v.vector.len(), 16);

    // The teacher beside it is not mistaken for a model.
    assert!(
        report
            .teacher_path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("_teacher.safetensors")
    );
    let err = WorldModel::load(
        &report.teacher_path,
        &report.vocab_path,
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("training-only EMA teacher"),
        "{err}"
    );
    let meta = Checkpoint::open(&report.model_path)
        .unwrap()
        .metadata()
        .cloned()
        .unwrap();
    assert_eq!(meta["steps"], "40");
    assert_eq!(meta["data_sha256"].len(), 64);
}

/// A run stopped at step 17 (its last checkpoint at 15 left behind it,
/// then rewritten at the stop) and run again ends with the very bytes of a
/// run that never stopped: same weights, teacher, optimiser moments and
/// batches. The finished run leaves no checkpoint.
#[test]
fn a_stopped_run_resumes_on_the_straight_path() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let straight = train(&tiny_config(&corpus, &dir.path().join("straight"))).unwrap();

    let mut cfg = tiny_config(&corpus, &dir.path().join("split"));
    cfg.checkpoint_every = 5;
    cfg.stop_after = Some(17);
    let first = train(&cfg).unwrap();
    assert!(!first.finished);
    assert_eq!(first.losses.len(), 17);
    assert!(!first.model_path.exists());
    let checkpoint = tofy::train::trainer::checkpoint_path(&cfg.out);
    assert!(checkpoint.exists());

    cfg.stop_after = None;
    let second = train(&cfg).unwrap();
    assert!(second.finished);
    assert_eq!(second.resumed_at, 17);
    assert_eq!(
        second.losses, straight.losses,
        "the same batches, the same losses"
    );
    assert_eq!(second.log, straight.log);
    for (a, b) in [
        (&straight.model_path, &second.model_path),
        (&straight.teacher_path, &second.teacher_path),
    ] {
        let (a, b) = (tensors(a), tensors(b));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(x, y, "{name} differs after the resume");
        }
    }
    assert!(!checkpoint.exists(), "a finished run leaves no checkpoint");
}

/// A checkpoint of another configuration is refused before any step,
/// with the file's name and what to do, and left as it was.
#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let mut cfg = tiny_config(&corpus, &dir.path().join("out"));
    cfg.stop_after = Some(3);
    train(&cfg).unwrap();
    let checkpoint = tofy::train::trainer::checkpoint_path(&cfg.out);
    let before = std::fs::read(&checkpoint).unwrap();

    cfg.stop_after = None;
    cfg.lr *= 2.0;
    let err = train(&cfg).err().unwrap().to_string();
    assert!(err.contains("another run"), "{err}");
    assert!(err.contains("train-world.run.safetensors"), "{err}");
    assert!(err.contains("delete it to start the run afresh"), "{err}");
    assert_eq!(std::fs::read(&checkpoint).unwrap(), before);
}

/// Ctrl-C on `tofy train-world` ends the step, writes the checkpoint and
/// exits 130 with one line that says how to go on; the same command then
/// resumes from that step (here only to `--stop-after`, a few steps on).
#[test]
fn train_world_ctrl_c_writes_the_checkpoint_and_the_same_command_resumes() {
    use std::io::{BufRead, BufReader, Read};

    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let out = dir.path().join("out");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train-world",
            corpus.to_str().unwrap(),
            "1000000",
            "8",
            "16",
            "8",
            "1",
            "2",
            "50",
            "8",
            "--out",
            out.to_str().unwrap(),
            "--log-every",
            "5",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(args(&[]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Training has begun: a log line came.
    while !seen.contains("step      5") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    common::signal(&child, libc::SIGINT);
    stderr.read_to_string(&mut seen).unwrap();
    let status = common::exit_status(&mut child, "tofy train-world");
    assert_eq!(status.code(), Some(130), "{status}: {seen}");
    let stopped: usize = seen
        .split("interrupted at step ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'interrupted at step N;' line: {seen}"));
    assert!(stopped >= 5, "{seen}");
    assert!(!seen.contains("error"), "no error line for Ctrl-C: {seen}");
    let checkpoint = tofy::train::trainer::checkpoint_path(&out);
    assert!(checkpoint.exists());

    let until = (stopped + 3).to_string();
    let resumed = tofy(
        &args(&["--stop-after", &until])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&resumed.stdout),
        String::from_utf8_lossy(&resumed.stderr),
    );
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "resuming {} at step {stopped}",
            checkpoint.display()
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("stopped at step {until} of 1000000"))
            && stdout.contains("without --stop-after"),
        "{stdout}"
    );
}

#[test]
fn init_encoder_loads_the_encoder_and_rejects_other_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let base = train(&tiny_config(&corpus, &dir.path().join("a"))).unwrap();

    let mut cfg = tiny_config(&corpus, &dir.path().join("b"));
    cfg.init_encoder = Some(base.model_path.clone());
    cfg.steps = 1;
    cfg.lr = 1e-9;
    cfg.seed = 99;
    let warm = train(&cfg).unwrap();
    for ((name, a), (_, b)) in tensors(&base.model_path)
        .iter()
        .zip(&tensors(&warm.model_path))
    {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        if name.starts_with("encoder.") {
            assert!(
                diff < 1e-5,
                "{name} was not loaded from --init-encoder (diff {diff:e})"
            );
        } else if name.starts_with("world_transition.fc") {
            assert!(diff > 1e-3, "{name} should be freshly initialised");
        }
    }

    let mut wrong = tiny_config(&corpus, &dir.path().join("c"));
    wrong.init_encoder = Some(base.model_path.clone());
    wrong.dim = 64;
    let err = train(&wrong).err().unwrap().to_string();
    assert!(
        err.contains("encoder.") && err.contains("has shape") && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn prepare_chitchat_on_a_synthetic_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let msg = |t: &str| serde_json::json!({"text": t, "timestamp": "2018-01-01T00:00:00Z", "sender": "x"});
    let mut conversations = serde_json::Map::new();
    for i in 0..20 {
        let turns = serde_json::json!([
            [msg(&format!("hi {i}")), msg("there")],
            [msg("hello")],
            [msg("  "), msg("bye\tnow")]
        ]);
        conversations.insert(format!("c{i:02}"), serde_json::json!({ "messages": turns }));
    }
    let dataset = dir.path().join("dataset.json");
    std::fs::write(&dataset, serde_json::to_string(&conversations).unwrap()).unwrap();
    let out = dir.path().join("pairs.tsv");
    let done = tofy::data::chitchat::prepare(&dataset, &out).unwrap();
    assert_eq!(
        (done.conversations, done.train_pairs, done.heldout_pairs),
        (20, 38, 2)
    );
    let train_text = std::fs::read_to_string(&out).unwrap();
    assert!(
        train_text.starts_with("hi 0 there\thello\nhello\tbye now\nhi 1 there\thello\n"),
        "{train_text}"
    );
    let held = std::fs::read_to_string(dir.path().join("pairs.heldout.tsv")).unwrap();
    assert_eq!(
        held, "hi 19 there\thello\nhello\tbye now\n",
        "every 20th conversation is held out"
    );
    // The 19 training conversations: the 10th (c09) validates, the rest fit.
    assert_eq!((done.fit_pairs, done.valid_pairs), (36, 2));
    let valid = std::fs::read_to_string(dir.path().join("pairs.valid.tsv")).unwrap();
    assert_eq!(valid, "hi 9 there\thello\nhello\tbye now\n");
    let fit = std::fs::read_to_string(dir.path().join("pairs.fit.tsv")).unwrap();
    let mut lines: Vec<&str> = fit.lines().chain(valid.lines()).collect();
    let mut train_lines: Vec<&str> = train_text.lines().collect();
    lines.sort_unstable();
    train_lines.sort_unstable();
    assert_eq!(
        lines, train_lines,
        "fit and valid make up the training file"
    );
    // Each file's sidecar names every pair's conversation, and the order
    // alone (chained pairs) gives the same grouping.
    let held_ids = std::fs::read_to_string(dir.path().join("pairs.heldout.conversations")).unwrap();
    assert_eq!(held_ids, "c19\nc19\n");
    for name in [
        "pairs.tsv",
        "pairs.heldout.tsv",
        "pairs.fit.tsv",
        "pairs.valid.tsv",
    ] {
        let path = dir.path().join(name);
        let pairs = tofy::data::pairs::read(&path).unwrap();
        let kept = tofy::data::pairs::conversations(&path, &pairs).unwrap();
        assert_eq!(kept.source, "sidecar");
        assert_eq!(kept.ids.len(), pairs.len());
        std::fs::rename(
            tofy::data::pairs::conversations_path(&path),
            dir.path().join("moved"),
        )
        .unwrap();
        let chained = tofy::data::pairs::conversations(&path, &pairs).unwrap();
        assert_eq!(chained.source, "chained");
        let same_group =
            |ids: &[String]| -> Vec<bool> { ids.windows(2).map(|w| w[0] == w[1]).collect() };
        assert_eq!(same_group(&kept.ids), same_group(&chained.ids), "{name}");
        // The history twin: the same replies and conversations, line for
        // line, with the conversation so far as the context.
        let twin = tofy::data::pairs::history_path(&path);
        tofy::data::pairs::world_contexts(&twin, &pairs).unwrap();
        let twin_pairs = tofy::data::pairs::read(&twin).unwrap();
        let twin_ids = tofy::data::pairs::conversations(&twin, &twin_pairs).unwrap();
        assert_eq!(twin_ids.source, "sidecar");
    }
    let held_history =
        std::fs::read_to_string(dir.path().join("pairs.heldout.history.tsv")).unwrap();
    assert_eq!(
        held_history,
        "hi 19 there\thello\nhi 19 there | hello\tbye now\n"
    );
    // A twin of another file is refused, naming what differs.
    let err = tofy::data::pairs::world_contexts(
        &dir.path().join("pairs.heldout.history.tsv"),
        &tofy::data::pairs::read(&dir.path().join("pairs.valid.tsv")).unwrap()[..1],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("2 pairs where the pairs file has 1"), "{err}");
}

#[test]
fn eval_world_scores_against_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = tiny_corpus(dir.path());
    let report = train(&tiny_config(&corpus, &dir.path().join("m"))).unwrap();
    let model = WorldModel::load(
        &report.model_path,
        &report.vocab_path,
        &LoadOptions::default(),
    )
    .unwrap();
    // Pairs whose next turn is the context itself: the copy baseline is
    // then perfect, which pins down the metric definitions.
    let same: Vec<Pair> = (0..30)
        .map(|i| Pair {
            context: format!("hello there {i} how are you {}", i * 7),
            next: format!("hello there {i} how are you {}", i * 7),
        })
        .collect();
    let r = tofy::eval::evaluate(&model, &model, &same, 1000).unwrap();
    assert_eq!((r.pairs, r.candidates), (30, 30));
    assert!((r.copy_baseline.cosine - 1.0).abs() < 1e-6 && r.copy_baseline.l2 < 1e-5);
    // R²: 1 for the perfect copy, 0 for the mean by construction.
    assert!(
        (r.copy_baseline.r2 - 1.0).abs() < 1e-6,
        "{}",
        r.copy_baseline.r2
    );
    assert!(r.mean_baseline.r2.abs() < 1e-6, "{}", r.mean_baseline.r2);
    assert!(r.transition.r2 <= 1.0);
    assert_eq!(r.retrieval_copy.top1, 1.0);
    assert!((r.retrieval_chance.top1 - 1.0 / 30.0).abs() < 1e-12);
    assert!(r.effective_rank >= 1.0 && r.effective_rank <= 32.0);
    assert!(r.latent_std_min > 0.0 && r.latent_std_min <= r.latent_std_mean);
    assert!((-1.0..=1.0).contains(&r.transition.cosine));

    // The ridge R² of the second half is undefined: the numbers past 14
    // are not in the tiny vocab, so those contexts are all alike.
    assert_eq!(r.ridge_r2_copy, None);

    // Against its own encoder, the cross-encoder R² is the report's own.
    let corpus_pairs = pairs::read(&corpus).unwrap();
    let r = tofy::eval::evaluate(&model, &model, &corpus_pairs, 1000).unwrap();
    let own =
        tofy::eval::ridge_r2_against(&model, &model, "self".into(), &corpus_pairs, 1000).unwrap();
    assert_eq!(own.pairs, 200);
    assert!(own.prediction.is_some(), "{own:?}");
    assert_eq!(own.prediction, r.ridge_r2_transition);
    assert_eq!(own.context, r.ridge_r2_copy);
}

fn tofy(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tofy"))
        .args(args)
        .output()
        .unwrap()
}

fn one_error_line(out: std::process::Output) -> String {
    assert!(!common::no_signal(out.status, "tofy").success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn train_world_bad_input_is_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let out_s = out.display().to_string();
    let corpus = tiny_corpus(d);
    let corpus_s = corpus.display().to_string();

    let empty = d.join("empty.tsv");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = one_error_line(tofy(&[
        "train-world",
        empty.to_str().unwrap(),
        "--out",
        &out_s,
    ]));
    assert!(e.contains("no valid `context<TAB>next_turn` line"), "{e}");

    let bad = d.join("bad.tsv");
    std::fs::write(&bad, "a\tb\nno separator here\n").unwrap();
    let e = one_error_line(tofy(&[
        "train-world",
        bad.to_str().unwrap(),
        "--out",
        &out_s,
    ]));
    assert!(e.contains("bad.tsv: line 2 has no tab or `|||`"), "{e}");

    let e = one_error_line(tofy(&["train-world", &corpus_s, "0", "--out", &out_s]));
    assert!(e.contains("steps must be at least 1"), "{e}");

    let e = one_error_line(tofy(&[
        "train-world",
        &corpus_s,
        "5",
        "4",
        "30",
        "16",
        "1",
        "4",
        "--out",
        &out_s,
    ]));
    assert!(e.contains("dim 30 is not divisible by num_heads 4"), "{e}");

    let e = one_error_line(tofy(&[
        "train-world",
        &corpus_s,
        "--embed-lr-scale=-1",
        "--out",
        &out_s,
    ]));
    assert!(
        e.contains("--embed-lr-scale -1 must be a number >= 0"),
        "{e}"
    );

    let blocker = d.join("a_file");
    std::fs::write(&blocker, "not a folder").unwrap();
    let under_file = blocker.join("out").display().to_string();
    let e = one_error_line(tofy(&[
        "train-world",
        &corpus_s,
        "5",
        "4",
        "32",
        "16",
        "1",
        "4",
        "--out",
        &under_file,
    ]));
    assert!(e.contains("output folder is not writable"), "{e}");

    assert!(
        !out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(),
        "nothing written on failure"
    );
}

#[test]
fn prepare_chatterbot_on_a_synthetic_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("english");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(
        corpus.join("b_science.yml"),
        "categories:\n- science\nconversations:\n- - what is two plus two\n  - 4\n- - what is two plus two\n  - four,\n    of course\n- - lonely turn\n- not a list\n- - a question\n  - - nested\n",
    )
    .unwrap();
    std::fs::write(
        corpus.join("a_food.yml"),
        "categories:\n- food\nconversations:\n- - do you eat\n  - only electricity\n  - \"is that tasty?\"\n",
    )
    .unwrap();
    std::fs::write(corpus.join("notes.txt"), "not yaml").unwrap();
    let out = dir.path().join("ood.tsv");
    let done = tofy::data::chatterbot::prepare(&corpus, &out).unwrap();
    assert_eq!((done.files, done.conversations, done.pairs), (2, 3, 4));
    assert_eq!(done.malformed, ["b_science 4", "b_science 5"]);
    // Files in name order; a bare number is a turn; a folded line is one line.
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "do you eat\tonly electricity\nonly electricity\tis that tasty?\n\
         what is two plus two\t4\nwhat is two plus two\tfour, of course\n"
    );
    // Conversations that open alike are one cluster.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ood.conversations")).unwrap(),
        "a_food/do you eat\na_food/do you eat\nb_science/what is two plus two\nb_science/what is two plus two\n"
    );
    let pairs = tofy::data::pairs::read(&out).unwrap();
    let twin = tofy::data::pairs::history_path(&out);
    let contexts = tofy::data::pairs::world_contexts(&twin, &pairs).unwrap();
    assert_eq!(contexts[1], "do you eat | only electricity");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = tofy::data::chatterbot::prepare(&empty, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no .yml file"), "{err}");
    std::fs::write(empty.join("bad.yml"), "categories: [x]\n").unwrap();
    let err = tofy::data::chatterbot::prepare(&empty, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `conversations` list"), "{err}");
}
