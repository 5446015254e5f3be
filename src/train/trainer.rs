//! `tofy train-world`: JEPA-style training of the world model.
//!
//! An online encoder reads the context; the transition predicts the latent
//! of the next turn; an EMA copy of the encoder (the teacher) encodes the
//! next turn as the target. The loss is the mean squared distance between
//! the L2-normalised prediction and target, plus a VICReg-style variance and
//! covariance penalty on the online context latents: without it every text
//! pools to nearly the same latent (the seed's recipe collapsed within 100
//! steps) and the conditioning carries no information. An InfoNCE term
//! (on by default) asks each prediction to pick its own next turn out of the
//! batch's: with the MSE alone the prediction drifted to what all next turns
//! share, and retrieved the true next turn no better than the context's own
//! latent did (models/world/README.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::adam::{Adam, AdamParams};
use super::model::{CandleWorld, Encoder, pad_ids};
use super::run::{self, RunMeta};
use super::{TrainError, build_vocab};
use crate::data::{chitchat, pairs, write_atomic};
use crate::world::checkpoint::{self, Checkpoint, TensorData};
use crate::world::{Vocab, WorldConfig, encode};

/// EMA decay of the teacher at the first and the last step (cosine schedule).
const EMA_START: f64 = 0.996;
const EMA_END: f64 = 0.9999;
/// Share of the steps spent warming the learning rate up linearly.
const WARMUP_FRACTION: f64 = 0.05;
/// The cosine schedule ends at this fraction of the peak learning rate.
const FINAL_LR_FRACTION: f64 = 0.1;
/// Temperature of the InfoNCE logits (cosines / T), as in CLIP-style training.
const NCE_TEMPERATURE: f64 = 0.1;
/// The token embeddings, trained at `embed_lr_scale` × the learning rate.
const EMBEDDING: &str = "encoder.embed.weight";
/// Held-out pairs scored at each log line.
const HELDOUT_EVAL_PAIRS: usize = 512;

/// Everything `train-world` needs; the CLI fills it from the seed's
/// positional arguments.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub pairs: PathBuf,
    pub steps: usize,
    pub batch: usize,
    pub dim: usize,
    pub max_seq: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Most frequent corpus tokens kept, after the three reserved ones.
    pub max_vocab: usize,
    pub bridge_dim: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight of the VICReg variance term (hinge on each dimension's std).
    pub var_weight: f64,
    /// Weight of the VICReg covariance term (off-diagonal covariance²).
    pub cov_weight: f64,
    /// Weight of the InfoNCE term: each prediction must pick its own target
    /// out of the batch's (0 disables).
    pub nce_weight: f64,
    /// Learning rate of the encoder's token embeddings, as a multiple of `lr`.
    /// An embedding row only gets a gradient when its token is in the batch,
    /// so at the shared rate a word seen a hundred times an epoch hardly
    /// moves from its unit-scale initial vector.
    pub embed_lr_scale: f64,
    pub init_encoder: Option<PathBuf>,
    /// Held-out pairs for the logged cosine; defaults to the
    /// `prepare-chitchat` sibling `<pairs>.heldout.tsv` when it exists.
    pub heldout: Option<PathBuf>,
    pub seed: u64,
    pub out: PathBuf,
    /// Log a line every this many steps.
    pub log_every: usize,
    /// Write the run's checkpoint ([`checkpoint_path`]) every this many
    /// steps (0: never). A run that finds its own checkpoint continues from
    /// it, on exactly the path it would have taken without the stop.
    pub checkpoint_every: usize,
    /// Stop after this step, checkpoint written, as if interrupted: a long
    /// run split over several sittings (the same command, run again, goes
    /// on).
    pub stop_after: Option<usize>,
    /// Set by a signal handler: the run writes its checkpoint at the end of
    /// the step and stops with [`TrainError::Interrupted`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub model_path: PathBuf,
    pub teacher_path: PathBuf,
    pub vocab_path: PathBuf,
    pub config: WorldConfig,
    /// Loss at every step.
    pub losses: Vec<f32>,
    /// (step, train transition cosine, held-out transition cosine if any).
    pub log: Vec<(usize, f32, Option<f32>)>,
    pub data_hash: String,
    /// Seconds this process trained (not a resumed run's earlier ones).
    pub seconds: f64,
    /// The step this process resumed from (0 for a fresh run).
    pub resumed_at: usize,
    /// Whether the model files were written: false when the run stopped at
    /// `stop_after` with its checkpoint.
    pub finished: bool,
}

/// A tensor name with its shape and row-major values.
type NamedWeights = (String, (Vec<usize>, Vec<f32>));

/// Token ids of every pair, truncated to max_seq.
struct Encoded {
    context: Vec<Vec<u32>>,
    next: Vec<Vec<u32>>,
}

impl Encoded {
    fn new(pairs: &[pairs::Pair], vocab: &Vocab, max_seq: usize) -> Self {
        let ids = |text: &str| encode(vocab, text, max_seq).map(|e| e.ids);
        let (context, next) = pairs
            .iter()
            .filter_map(|p| Some((ids(&p.context)?, ids(&p.next)?)))
            .unzip();
        Self { context, next }
    }

    fn len(&self) -> usize {
        self.context.len()
    }
}

/// Trains a world model and writes `model_world_<size>.safetensors`, its
/// `_teacher` twin and `vocab_world.txt` into `cfg.out`.
pub fn train(cfg: &TrainConfig) -> Result<TrainReport, TrainError> {
    validate(cfg)?;
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).map_err(|e| TrainError::OutDir {
        path: cfg.out.clone(),
        error: e,
    })?;
    // Fail now, not after an hour of training, if the folder is not writable.
    tempfile::NamedTempFile::new_in(&cfg.out).map_err(|e| TrainError::OutDir {
        path: cfg.out.clone(),
        error: e,
    })?;

    let train_pairs = pairs::read(&cfg.pairs)?;
    let data_hash = hash_file(&cfg.pairs)?;
    let vocab = match &cfg.init_encoder {
        // The embedding rows of the initial encoder belong to its vocab.
        Some(init) => Vocab::load(vocab_beside(init))?,
        None => build_vocab(&train_pairs, cfg.max_vocab),
    };
    let world = WorldConfig {
        dim: cfg.dim,
        num_layers: cfg.num_layers,
        num_heads: cfg.num_heads,
        max_seq: cfg.max_seq,
        vocab_size: vocab.len(),
        bridge_dim: cfg.bridge_dim,
    };
    let data = Encoded::new(&train_pairs, &vocab, cfg.max_seq);
    let heldout_path = cfg.heldout.clone().or_else(|| {
        let p = chitchat::heldout_path(&cfg.pairs);
        p.exists().then_some(p)
    });
    let heldout = match &heldout_path {
        Some(p) => Some(Encoded::new(&pairs::read(p)?, &vocab, cfg.max_seq)),
        None => None,
    };

    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut initial = initial_weights(&world, &mut rng);
    if let Some(init) = &cfg.init_encoder {
        load_encoder(init, &world, &mut initial)?;
    }
    let varmap = VarMap::new();
    {
        let mut vars = varmap.data().lock().expect("var map lock");
        for (name, (shape, values)) in &initial {
            let tensor = Tensor::from_slice(values, shape.as_slice(), &device)?;
            vars.insert(name.clone(), Var::from_tensor(&tensor)?);
        }
    }
    let online = CandleWorld::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
        &world,
    )?;
    let mut teacher_weights: HashMap<String, Tensor> = encoder_vars(&varmap)
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().detach().copy()?)))
        .collect::<Result<_, candle_core::Error>>()?;

    // One optimiser; the token embeddings run at their own rate (their
    // rows get a gradient only when their token is in the batch).
    let vars = named_vars(&varmap);
    let rated = vars
        .iter()
        .map(|(name, var)| {
            let rate = if name == EMBEDDING {
                cfg.embed_lr_scale
            } else {
                1.0
            };
            (var.clone(), rate)
        })
        .collect();
    let mut optimizer = Adam::with_rates(
        rated,
        AdamParams {
            weight_decay: cfg.weight_decay,
            ..AdamParams::new(cfg.lr)
        },
    )?;
    let checkpoint = checkpoint_path(&cfg.out);
    let run = run_key(cfg, &data_hash);
    let mut progress = if checkpoint.exists() {
        let progress = load_checkpoint(
            &checkpoint,
            &run,
            &vars,
            &mut teacher_weights,
            &mut optimizer,
        )?;
        eprintln!(
            "train-world: resuming {} at step {}",
            checkpoint.display(),
            progress.step
        );
        progress
    } else {
        Progress::default()
    };
    let resumed_at = progress.step;
    // The batches are the seed's: a resumed run draws the ones it already
    // took and goes on with the next.
    for _ in 0..resumed_at * cfg.batch {
        rng.random_range(0..data.len());
    }
    let stop = cfg.stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    let bar = progress_bar(cfg);
    bar.set_position(resumed_at as u64);
    let save = |progress: &Progress,
                teacher: &HashMap<String, Tensor>,
                optimizer: &Adam|
     -> Result<(), TrainError> {
        save_checkpoint(&checkpoint, &run, progress, &vars, teacher, optimizer)
    };
    while progress.step < stop {
        let step = progress.step;
        let lr = learning_rate(cfg, step);
        optimizer.set_learning_rate(lr);
        let teacher = teacher_encoder(&teacher_weights, &world, &device)?;
        let batch: Vec<usize> = (0..cfg.batch)
            .map(|_| rng.random_range(0..data.len()))
            .collect();
        let (loss, cosine) = batch_loss(cfg, &world, &online, &teacher, &data, &batch, &device)?;
        optimizer.backward_step(&loss)?;
        update_teacher(&mut teacher_weights, &varmap, ema_decay(cfg, step))?;

        let loss_value = loss.to_scalar::<f32>()?;
        progress.losses.push(loss_value);
        progress.step += 1;
        bar.set_message(format!("loss {loss_value:.4}"));
        bar.inc(1);
        if (step + 1) % cfg.log_every == 0 || step + 1 == cfg.steps {
            let train_cos = cosine.to_scalar::<f32>()?;
            let teacher = teacher_encoder(&teacher_weights, &world, &device)?;
            let held = match &heldout {
                Some(h) if h.len() > 0 => {
                    Some(heldout_cosine(&world, &online, &teacher, h, &device)?)
                }
                _ => None,
            };
            let held_text = held.map_or("n/a".to_string(), |c| format!("{c:.4}"));
            // `suspend` prints whether or not the bar is drawn (it is hidden
            // when stderr is not a terminal).
            bar.suspend(|| {
                eprintln!(
                    "step {:>6}  loss {loss_value:.4}  train cos {train_cos:.4}  held-out cos {held_text}",
                    step + 1
                )
            });
            progress.log.push((step + 1, train_cos, held));
        }
        let cancelled = cfg
            .cancel
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Acquire));
        if cancelled {
            bar.finish_and_clear();
            save(&progress, &teacher_weights, &optimizer)?;
            return Err(TrainError::Interrupted {
                step: progress.step,
                checkpoint: checkpoint.clone(),
            });
        }
        let every = cfg.checkpoint_every;
        if every > 0 && progress.step % every == 0 && progress.step < cfg.steps {
            save(&progress, &teacher_weights, &optimizer)?;
        }
    }
    bar.finish_and_clear();
    let finished = progress.step == cfg.steps;
    let (model_path, teacher_path, vocab_path) = if finished {
        let paths = write_model(cfg, &world, &varmap, &teacher_weights, &vocab, &data_hash)?;
        // The model files hold everything the checkpoint did that outlives
        // the run; the run key names its step count, so nothing can resume it.
        if checkpoint.exists() {
            std::fs::remove_file(&checkpoint)
                .map_err(|e| crate::data::DataError::io(&checkpoint, e))?;
        }
        paths
    } else {
        // Stopped at --stop-after: the checkpoint is the run's output.
        save(&progress, &teacher_weights, &optimizer)?;
        Default::default()
    };
    Ok(TrainReport {
        model_path,
        teacher_path,
        vocab_path,
        config: world,
        losses: progress.losses,
        log: progress.log,
        data_hash,
        seconds: started.elapsed().as_secs_f64(),
        resumed_at,
        finished,
    })
}

/// Writes `model_world_<size>.safetensors`, its `_teacher` twin and
/// `vocab_world.txt` into `cfg.out`; returns their paths.
fn write_model(
    cfg: &TrainConfig,
    world: &WorldConfig,
    varmap: &VarMap,
    teacher_weights: &HashMap<String, Tensor>,
    vocab: &Vocab,
    data_hash: &str,
) -> Result<(PathBuf, PathBuf, PathBuf), TrainError> {
    let size = format!("{:.2}M", parameter_count(world) as f64 / 1e6);
    let model_path = cfg.out.join(format!("model_world_{size}.safetensors"));
    let teacher_path = cfg
        .out
        .join(format!("model_world_{size}_teacher.safetensors"));
    let vocab_path = cfg.out.join("vocab_world.txt");
    let mut meta: HashMap<String, String> = world.metadata().into_iter().collect();
    meta.insert("steps".into(), cfg.steps.to_string());
    meta.insert("data_sha256".into(), data_hash.to_string());
    meta.insert("seed".into(), cfg.seed.to_string());
    let mut teacher_meta = meta.clone();
    teacher_meta.insert(checkpoint::ROLE_KEY.into(), checkpoint::ROLE_TEACHER.into());
    checkpoint::save(&model_path, &var_tensors(varmap)?, Some(meta))?;
    // The teacher file is a complete checkpoint: the EMA encoder with the
    // online transition and bridge, so that eval-world can encode targets
    // with it exactly as training did.
    let teacher_tensors = var_tensors(varmap)?
        .into_iter()
        .map(|(name, online)| match teacher_weights.get(&name) {
            Some(t) => Ok((name, tensor_data(t)?)),
            None => Ok((name, online)),
        })
        .collect::<Result<Vec<_>, candle_core::Error>>()?;
    checkpoint::save(&teacher_path, &teacher_tensors, Some(teacher_meta))?;
    write_atomic(&vocab_path, |out| {
        vocab.tokens().iter().try_for_each(|t| writeln!(out, "{t}"))
    })?;
    Ok((model_path, teacher_path, vocab_path))
}

/// Where a run writing into `out` keeps its checkpoint.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("train-world.run.safetensors")
}

/// The checkpoint's format tag.
const CHECKPOINT_FORMAT: &str = "tofy-world-run-1";

/// Everything that makes two runs the same run: the data, every
/// hyper-parameter (the step count included: the schedules depend on it)
/// and the seed. The log interval, the held-out file and the output folder
/// change nothing a run computes.
fn run_key(cfg: &TrainConfig, data_hash: &str) -> String {
    format!(
        "data {} steps {} batch {} dim {} max_seq {} layers {} heads {} max_vocab {} bridge {} \
         lr {} weight_decay {} var {} cov {} nce {} embed_lr_scale {} init_encoder {} seed {}",
        &data_hash[..16.min(data_hash.len())],
        cfg.steps,
        cfg.batch,
        cfg.dim,
        cfg.max_seq,
        cfg.num_layers,
        cfg.num_heads,
        cfg.max_vocab,
        cfg.bridge_dim,
        cfg.lr,
        cfg.weight_decay,
        cfg.var_weight,
        cfg.cov_weight,
        cfg.nce_weight,
        cfg.embed_lr_scale,
        cfg.init_encoder
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string()),
        cfg.seed
    )
}

/// A run's history: the steps taken, each step's loss and the log lines.
#[derive(Default)]
struct Progress {
    step: usize,
    losses: Vec<f32>,
    log: Vec<(usize, f32, Option<f32>)>,
}

/// Writes the online weights, the teacher's, the optimiser's moments and
/// the history.
fn save_checkpoint(
    path: &Path,
    run: &str,
    progress: &Progress,
    vars: &[(String, Var)],
    teacher: &HashMap<String, Tensor>,
    optimizer: &Adam,
) -> Result<(), TrainError> {
    let mut tensors = Vec::with_capacity(vars.len() * 3 + teacher.len());
    for ((name, var), (m, v)) in vars.iter().zip(optimizer.moments()) {
        tensors.push((name.clone(), tensor_data(var.as_tensor())?));
        tensors.push((format!("adam.m.{name}"), tensor_data(m)?));
        tensors.push((format!("adam.v.{name}"), tensor_data(v)?));
    }
    for (name, t) in teacher {
        tensors.push((format!("teacher.{name}"), tensor_data(t)?));
    }
    let held = |h: &Option<f32>| h.map_or("-".to_string(), |c| c.to_string());
    let meta = HashMap::from([
        ("tofy.format".to_string(), CHECKPOINT_FORMAT.to_string()),
        ("run".to_string(), run.to_string()),
        ("step".to_string(), progress.step.to_string()),
        ("adam_steps".to_string(), optimizer.steps().to_string()),
        (
            "losses".to_string(),
            run::join(&progress.losses, f32::to_string),
        ),
        (
            "log".to_string(),
            run::join(&progress.log, |(s, c, h)| format!("{s}:{c}:{}", held(h))),
        ),
    ]);
    checkpoint::save(path, &tensors, Some(meta))?;
    Ok(())
}

/// Reads a checkpoint of this run back into the variables, the teacher and
/// the optimiser; refuses one of another run.
fn load_checkpoint(
    path: &Path,
    run: &str,
    vars: &[(String, Var)],
    teacher: &mut HashMap<String, Tensor>,
    optimizer: &mut Adam,
) -> Result<Progress, TrainError> {
    let file = Checkpoint::open(path)?;
    let meta = RunMeta::read(path, &file, CHECKPOINT_FORMAT, "train-world", run)?;
    let tensor = |name: &str, like: &Tensor| -> Result<Tensor, TrainError> {
        let values = file.values(name, like.dims())?;
        Ok(Tensor::from_vec(values, like.dims(), &Device::Cpu)?)
    };
    let mut moments = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        var.set(&tensor(name, var.as_tensor())?)?;
        moments.push((
            tensor(&format!("adam.m.{name}"), var.as_tensor())?,
            tensor(&format!("adam.v.{name}"), var.as_tensor())?,
        ));
    }
    for (name, t) in teacher.iter_mut() {
        *t = tensor(&format!("teacher.{name}"), t)?;
    }
    optimizer.restore(meta.number("adam_steps")?, moments)?;
    let losses = meta.list("losses", |l| l.parse::<f32>().ok())?;
    let log = meta.list("log", |entry| {
        let mut parts = entry.split(':');
        let step = parts.next()?.parse().ok()?;
        let cos = parts.next()?.parse().ok()?;
        let held = match parts.next()? {
            "-" => None,
            h => Some(h.parse().ok()?),
        };
        Some((step, cos, held))
    })?;
    let step = meta.number("step")?;
    if losses.len() != step {
        return Err(meta.bad(format!("{} losses for {step} steps", losses.len())));
    }
    Ok(Progress { step, losses, log })
}

fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
    let positive = [
        ("steps", cfg.steps),
        ("batch", cfg.batch),
        ("dim", cfg.dim),
        ("max_seq", cfg.max_seq),
        ("num_layers", cfg.num_layers),
        ("num_heads", cfg.num_heads),
        ("max_vocab", cfg.max_vocab),
        ("bridge_dim", cfg.bridge_dim),
        ("log_every", cfg.log_every),
    ];
    if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(TrainError::Invalid(format!("{name} must be at least 1")));
    }
    if !cfg.dim.is_multiple_of(cfg.num_heads) {
        return Err(TrainError::Invalid(format!(
            "dim {} is not divisible by num_heads {}",
            cfg.dim, cfg.num_heads
        )));
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(TrainError::Invalid(format!(
            "--lr {} must be a positive number",
            cfg.lr
        )));
    }
    if !(cfg.embed_lr_scale.is_finite() && cfg.embed_lr_scale >= 0.0) {
        return Err(TrainError::Invalid(format!(
            "--embed-lr-scale {} must be a number >= 0 (0 freezes the token embeddings)",
            cfg.embed_lr_scale
        )));
    }
    Ok(())
}

/// Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak.
fn learning_rate(cfg: &TrainConfig, step: usize) -> f64 {
    let warmup = ((cfg.steps as f64 * WARMUP_FRACTION) as usize).max(1);
    if step < warmup {
        return cfg.lr * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (cfg.steps - warmup).max(1) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    cfg.lr * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine)
}

/// Teacher EMA decay, rising from EMA_START to EMA_END on a cosine.
fn ema_decay(cfg: &TrainConfig, step: usize) -> f64 {
    let progress = step as f64 / (cfg.steps.max(2) - 1) as f64;
    EMA_END - (EMA_END - EMA_START) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The loss of one batch and the batch's mean transition cosine.
fn batch_loss(
    cfg: &TrainConfig,
    world: &WorldConfig,
    online: &CandleWorld,
    teacher: &Encoder,
    data: &Encoded,
    batch: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor), candle_core::Error> {
    let (ctx, ctx_lens) = gather(&data.context, batch);
    let (next, next_lens) = gather(&data.next, batch);
    let latent = online.encode(&pad_ids(&ctx, world.max_seq, device)?, &ctx_lens)?;
    let predicted = online.transition(&latent)?;
    let target = teacher
        .forward(&pad_ids(&next, world.max_seq, device)?, &next_lens)?
        .detach();
    let (p, t) = (l2_normalize(&predicted)?, l2_normalize(&target)?);
    let cosine = (&p * &t)?.sum(1)?;
    // ‖p − t‖² = 2 − 2·cos for unit vectors; averaged over the batch.
    let prediction = (2.0 - (cosine.mean_all()? * 2.0)?)?;
    let mut loss = (prediction + vicreg(&latent, cfg.var_weight, cfg.cov_weight)?)?;
    if cfg.nce_weight > 0.0 {
        loss = (loss + (info_nce(&p, &t)? * cfg.nce_weight)?)?;
    }
    Ok((loss, cosine.mean_all()?))
}

/// The id lists at `indices` and their lengths.
fn gather<'a>(side: &'a [Vec<u32>], indices: &[usize]) -> (Vec<&'a [u32]>, Vec<usize>) {
    indices
        .iter()
        .map(|&i| (side[i].as_slice(), side[i].len()))
        .unzip()
}

/// InfoNCE over the batch: cross-entropy of each unit prediction's cosines
/// to the batch's unit targets (at temperature NCE_TEMPERATURE) against
/// its own. The MSE alone rewards predicting what every next turn shares;
/// this asks the prediction to tell its next turn from the others.
fn info_nce(p: &Tensor, t: &Tensor) -> Result<Tensor, candle_core::Error> {
    let logits = (p.matmul(&t.t()?)? / NCE_TEMPERATURE)?;
    let labels = Tensor::arange(0u32, logits.dim(0)? as u32, logits.device())?;
    candle_nn::loss::cross_entropy(&logits, &labels)
}

/// VICReg variance (hinge at std 1) and covariance (off-diagonal²/D) terms.
fn vicreg(z: &Tensor, var_weight: f64, cov_weight: f64) -> Result<Tensor, candle_core::Error> {
    let (n, d) = z.dims2()?;
    let centered = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    let var = (centered.sqr()?.sum(0)? / (n.max(2) - 1) as f64)?;
    let std = (&var + 1e-4)?.sqrt()?;
    let variance = (1.0 - std)?.relu()?.mean_all()?;
    let cov = (centered.t()?.matmul(&centered)? / (n.max(2) - 1) as f64)?;
    // The diagonal of the covariance is the variance.
    let off_diagonal = (cov.sqr()?.sum_all()? - var.sqr()?.sum_all()?)?;
    let covariance = (off_diagonal / d as f64)?;
    (variance * var_weight)? + (covariance * cov_weight)?
}

fn l2_normalize(x: &Tensor) -> Result<Tensor, candle_core::Error> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Mean transition cosine on up to HELDOUT_EVAL_PAIRS held-out pairs.
fn heldout_cosine(
    world: &WorldConfig,
    online: &CandleWorld,
    teacher: &Encoder,
    data: &Encoded,
    device: &Device,
) -> Result<f32, candle_core::Error> {
    let n = data.len().min(HELDOUT_EVAL_PAIRS);
    let mut total = 0.0f32;
    for start in (0..n).step_by(64) {
        let idx: Vec<usize> = (start..(start + 64).min(n)).collect();
        let (ctx, ctx_lens) = gather(&data.context, &idx);
        let (next, next_lens) = gather(&data.next, &idx);
        let predicted = online
            .transition(&online.encode(&pad_ids(&ctx, world.max_seq, device)?, &ctx_lens)?)?;
        let target = teacher.forward(&pad_ids(&next, world.max_seq, device)?, &next_lens)?;
        let cos = (l2_normalize(&predicted.detach())? * l2_normalize(&target)?)?.sum(1)?;
        total += cos.sum_all()?.to_scalar::<f32>()?;
    }
    Ok(total / n as f32)
}

/// The online model's `encoder.*` variables.
fn encoder_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars = named_vars(varmap);
    vars.retain(|(name, _)| name.starts_with("encoder."));
    vars
}

/// Every variable with its checkpoint name, sorted by name.
fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let vars = varmap.data().lock().expect("var map lock");
    let mut out: Vec<_> = vars.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// teacher ← decay·teacher + (1 − decay)·online, for every encoder tensor.
fn update_teacher(
    teacher: &mut HashMap<String, Tensor>,
    varmap: &VarMap,
    decay: f64,
) -> Result<(), candle_core::Error> {
    for (name, var) in encoder_vars(varmap) {
        let old = &teacher[&name];
        // Detached: otherwise each update would keep the previous teacher
        // alive through candle's op graph, and memory grows every step
        // (a 2000-step run was OOM-killed at 24 GB).
        let new = ((old * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?.detach();
        teacher.insert(name, new);
    }
    Ok(())
}

fn teacher_encoder(
    weights: &HashMap<String, Tensor>,
    world: &WorldConfig,
    device: &Device,
) -> Result<Encoder, candle_core::Error> {
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, device);
    Encoder::new(vb.pp("encoder"), world)
}

fn tensor_data(t: &Tensor) -> Result<TensorData, candle_core::Error> {
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(TensorData::new(t.dims().to_vec(), &values))
}

fn var_tensors(varmap: &VarMap) -> Result<Vec<(String, TensorData)>, candle_core::Error> {
    let vars = varmap.data().lock().expect("var map lock");
    let mut out = vars
        .iter()
        .map(|(name, var)| Ok((name.clone(), tensor_data(var.as_tensor())?)))
        .collect::<Result<Vec<_>, candle_core::Error>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// PyTorch-style initial weights from a seeded generator (candle cannot
/// seed its CPU generator): Linear weights and biases U(±1/√fan_in),
/// LayerNorm 1 and 0, embeddings with unit variance.
fn initial_weights(world: &WorldConfig, rng: &mut StdRng) -> Vec<NamedWeights> {
    world
        .tensor_specs()
        .into_iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let is_norm = spec.name.contains(".ln");
            let values: Vec<f32> = if is_norm && spec.name.ends_with(".weight") {
                vec![1.0; n]
            } else if is_norm {
                vec![0.0; n]
            } else if spec.name.ends_with("embed.weight") {
                let a = 3f32.sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            } else {
                let fan_in = if spec.name.ends_with(".bias") {
                    fan_in_of(world, &spec.name)
                } else {
                    spec.shape[1]
                };
                let a = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            (spec.name, (spec.shape, values))
        })
        .collect()
}

/// Input width of the Linear layer a bias belongs to.
fn fan_in_of(world: &WorldConfig, bias_name: &str) -> usize {
    let weight = bias_name.replace(".bias", ".weight");
    world
        .tensor_specs()
        .into_iter()
        .find(|s| s.name == weight)
        .map_or(world.dim, |s| s.shape[1])
}

/// Overwrites the `encoder.*` tensors of `weights` with those of `path`,
/// which must have exactly the shapes of this run.
fn load_encoder(
    path: &Path,
    world: &WorldConfig,
    weights: &mut [NamedWeights],
) -> Result<(), TrainError> {
    let ckpt = Checkpoint::open(path)?;
    let mut loaded = 0;
    for (name, (shape, values)) in weights
        .iter_mut()
        .filter(|(n, _)| n.starts_with("encoder."))
    {
        *values = match shape.as_slice() {
            &[rows, cols] => ckpt.matrix(name, rows, cols)?.into_raw_vec_and_offset().0,
            &[len] => ckpt.vector(name, len)?.to_vec(),
            other => unreachable!("encoder tensors are 1-D or 2-D, got {other:?}"),
        };
        loaded += 1;
    }
    debug_assert_eq!(
        loaded,
        world
            .tensor_specs()
            .iter()
            .filter(|s| s.name.starts_with("encoder."))
            .count()
    );
    Ok(())
}

/// `vocab_world.txt` in the folder of `checkpoint`.
fn vocab_beside(checkpoint: &Path) -> PathBuf {
    checkpoint.with_file_name("vocab_world.txt")
}

fn parameter_count(world: &WorldConfig) -> usize {
    world
        .tensor_specs()
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum()
}

fn hash_file(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| crate::data::DataError::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn progress_bar(cfg: &TrainConfig) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}
