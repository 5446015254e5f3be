//! `tofy infer-agent` (prompt → world model → conditioned decoder → reply
//! streamed to stdout) and `tofy doctor` (what would be used, and what to
//! fix).

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::decoder_args::DecoderArgs;
use super::interrupt::Interrupt;
use super::{DeviceArgs, WorldSizeArgs, WorldSpec, split_world};
use crate::conditioning::CondMode;
use crate::decoder::config::DEFAULT_MAX_NEW_TOKENS;
use crate::decoder::{self, BackendKind, DecoderConfig, FinishReason, discovery};
use crate::engine::{AgentReply, AgentRequest, Engine, TurnOptions, default_mode};
use crate::projector::Projector;
use crate::world::{LoadOptions, WorldModel, WorldOverrides};

#[derive(Debug, Args)]
pub struct InferArgs {
    /// `[MODEL VOCAB] PROMPT [DIM MAX_SEQ LAYERS HEADS BRIDGE_DIM MAX_NEW_TOKENS]`, the seed's
    /// order. Without MODEL VOCAB the embedded default world model reads the prompt; the
    /// sizes are checked against the checkpoint; MAX_NEW_TOKENS defaults to 4096 (bounded
    /// by the context).
    #[arg(required = true, value_name = "ARGS", allow_negative_numbers = true)]
    inputs: Vec<String>,
    #[command(flatten)]
    sizes: WorldSizeArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Replace the conditioning vector with zeros (to see what it changes).
    #[arg(long)]
    ablate_conditioning: bool,
    /// Most tokens to generate (the positional MAX_NEW_TOKENS; this flag wins).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_new_tokens: Option<u32>,
    /// Stop the reply before this string (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Print one JSON object (reply, backend, model, conditioning, token counts, timings)
    /// instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    decoder: DecoderArgs,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// `[MODEL VOCAB]`: a world model to check instead of the embedded default.
    #[arg(value_name = "MODEL VOCAB", num_args = 0..=2)]
    world: Vec<String>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    decoder: DecoderArgs,
}

/// The seed's positional tail after the prompt.
const POSITIONAL_NAMES: [&str; 6] = [
    "dim",
    "max_seq",
    "layers",
    "heads",
    "bridge_dim",
    "max_new_tokens",
];

/// The prompt, the positional size overrides and max_new_tokens.
struct Positional<'a> {
    prompt: &'a str,
    overrides: WorldOverrides,
    max_new_tokens: usize,
}

fn positional(rest: &[String]) -> anyhow::Result<Positional<'_>> {
    let (prompt, numbers) = rest
        .split_first()
        .context("no prompt given; usage: tofy infer-agent [MODEL VOCAB] PROMPT [DIM MAX_SEQ LAYERS HEADS BRIDGE_DIM MAX_NEW_TOKENS]")?;
    anyhow::ensure!(
        numbers.len() <= POSITIONAL_NAMES.len(),
        "too many arguments after the prompt: '{}' (expected at most DIM MAX_SEQ LAYERS HEADS BRIDGE_DIM MAX_NEW_TOKENS; quote a prompt that has spaces)",
        numbers[POSITIONAL_NAMES.len()..].join(" ")
    );
    let mut values = [None; 6];
    for (i, (text, name)) in numbers.iter().zip(POSITIONAL_NAMES).enumerate() {
        values[i] = Some(positive(text, name)?);
    }
    Ok(Positional {
        prompt,
        overrides: WorldOverrides {
            dim: values[0],
            max_seq: values[1],
            num_layers: values[2],
            num_heads: values[3],
            bridge_dim: values[4],
        },
        max_new_tokens: values[5].unwrap_or(DEFAULT_MAX_NEW_TOKENS),
    })
}

/// A positional number that must be a positive whole number.
pub(crate) fn positive(text: &str, name: &str) -> anyhow::Result<usize> {
    text.parse()
        .ok()
        .filter(|&v| v > 0)
        .with_context(|| format!("{name} '{text}' is not a positive whole number"))
}

/// Flags win over positional sizes when both are given.
pub(crate) fn merge(flags: WorldOverrides, positional: WorldOverrides) -> WorldOverrides {
    WorldOverrides {
        dim: flags.dim.or(positional.dim),
        max_seq: flags.max_seq.or(positional.max_seq),
        num_layers: flags.num_layers.or(positional.num_layers),
        num_heads: flags.num_heads.or(positional.num_heads),
        bridge_dim: flags.bridge_dim.or(positional.bridge_dim),
    }
}

/// An ignored NGL, a world model on the CPU, the stub's advice.
pub(crate) fn print_notices(engine: &Engine, config: &DecoderConfig) {
    for notice in notices(engine, config) {
        eprintln!("{notice}");
    }
}

/// What a user should know about the engine that was opened: an NGL this
/// build or machine ignores, a world model that fell back to the CPU (one
/// line when both have the same cause), the stub standing in for a model.
pub(crate) fn notices(engine: &Engine, config: &DecoderConfig) -> Vec<String> {
    let decoder = engine.decoder();
    let mut out = Vec::new();
    let ngl_ignored = decoder.backend() == BackendKind::Llama
        && config.ngl > 0
        && !decoder::llama::gpu_offload_supported();
    match (ngl_ignored, engine.world().cpu_fallback()) {
        (true, Some(why)) => out.push(format!(
            "note: no usable GPU ({why}): JEPA_DECODER_NGL={} ignored; llama.cpp and the world model run on the CPU",
            config.ngl
        )),
        (true, None) => out.push(format!(
            "note: JEPA_DECODER_NGL={} ignored: llama.cpp found no GPU and no RPC server (CPU only)",
            config.ngl
        )),
        (false, Some(_)) => out.extend(super::world_notice(engine.world())),
        (false, None) => {}
    }
    if decoder.backend() == BackendKind::Stub {
        out.push(decoder::STUB_ADVICE.to_string());
    }
    out
}

/// `infer-agent`: a signal stops it cleanly (see [`Interrupt`]); whatever
/// the run returned then, the command ends as interrupted.
pub fn infer(args: InferArgs) -> anyhow::Result<()> {
    let interrupt = Interrupt::install().context("installing the Ctrl-C handler")?;
    let result = infer_until(args, &interrupt);
    match interrupt.caught() {
        Some(interrupted) => Err(interrupted.into()),
        None => result,
    }
}

fn infer_until(args: InferArgs, interrupt: &Interrupt) -> anyhow::Result<()> {
    let (spec, rest) = split_world(
        &args.inputs,
        "[MODEL VOCAB] PROMPT [DIM MAX_SEQ LAYERS HEADS BRIDGE_DIM MAX_NEW_TOKENS]",
        true,
    )?;
    let pos = positional(rest)?;
    let options = LoadOptions {
        overrides: merge(args.sizes.into(), pos.overrides),
        device: args.device.device,
        ..Default::default()
    };
    let world = spec.load(&options)?;
    let config = DecoderConfig {
        cancel_load: Some(interrupt.flag()),
        ..args.decoder.config()
    };
    let projector = args.decoder.projector()?;
    let decoder = decoder::open(&config)?;
    let engine = Engine::new(world, decoder, args.decoder.cond_settings(), projector)?
        .with_control(args.decoder.control()?)?;
    // Only once the engine stands: an error is then the one line printed.
    print_notices(&engine, &config);
    let request = AgentRequest {
        prompt: pos.prompt.to_string(),
        max_new_tokens: args
            .max_new_tokens
            .map_or(pos.max_new_tokens, |n| n as usize),
        turn: TurnOptions {
            ablate: args.ablate_conditioning,
            ..TurnOptions::default()
        },
        sampling: config.sampling.clone(),
        stop: args.stop.clone(),
        cancel: Some(interrupt.flag()),
    };

    if args.json {
        let reply = engine.infer(&request, &mut |_| ControlFlow::Continue(()))?;
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &JsonReply::new(&engine, &reply))?;
        writeln!(out)?;
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    let reply = engine.infer(&request, &mut |piece| {
        // Each piece is flushed as it comes: the point is to watch it stream.
        match out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(err) => {
                write_error = Some(err);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(err) = write_error {
        return Err(err).context("writing the reply to stdout");
    }
    writeln!(out)?;
    if reply.generation.finish_reason == FinishReason::Length {
        eprintln!(
            "note: the reply stopped at {} tokens (max_new_tokens or the end of the context)",
            reply.generation.completion_tokens
        );
    }
    Ok(())
}

/// `--json`: everything about one turn.
#[derive(Serialize)]
struct JsonReply<'a> {
    reply: &'a str,
    backend: BackendKind,
    model: Option<String>,
    finish_reason: FinishReason,
    cond_mode: &'static str,
    cond_format: &'static str,
    /// Embedding rows in the prompt (prefix mode's K; 0 otherwise).
    k: usize,
    /// The projector prefix mode used.
    projector: Option<&'a str>,
    ablated: bool,
    world_tokens: usize,
    conditioning: &'a [f32],
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    timings: Timings,
}

#[derive(Serialize)]
struct Timings {
    world_ms: f64,
    time_to_first_token_ms: f64,
    prompt_ms: Option<f64>,
    total_ms: f64,
    /// Generated tokens per second after the first token.
    decode_tokens_per_second: Option<f64>,
}

impl<'a> JsonReply<'a> {
    fn new(engine: &'a Engine, reply: &'a AgentReply) -> Self {
        let g = &reply.generation;
        let steer = &reply.steer;
        let conditioning = steer.conditioning.as_ref();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let decode_time = g.total_time.saturating_sub(g.time_to_first_token);
        let decode_tokens_per_second = (g.completion_tokens > 1 && !decode_time.is_zero())
            .then(|| (g.completion_tokens - 1) as f64 / decode_time.as_secs_f64());
        Self {
            reply: &g.text,
            backend: engine.decoder().backend(),
            model: engine
                .decoder()
                .model_path()
                .map(|p| p.display().to_string()),
            finish_reason: g.finish_reason,
            cond_mode: steer.mode.name(),
            cond_format: steer.format.name(),
            k: steer.k(),
            projector: (steer.k() > 0)
                .then(|| engine.projector().map(|p| p.source()))
                .flatten(),
            ablated: conditioning.is_some_and(|c| c.ablated),
            world_tokens: conditioning.map_or(0, |c| c.world_tokens),
            conditioning: conditioning.map_or(&[], |c| c.vector.as_slice()),
            prompt_tokens: g.prompt_tokens,
            cached_tokens: g.cached_tokens,
            completion_tokens: g.completion_tokens,
            timings: Timings {
                world_ms: ms(steer.world_time),
                time_to_first_token_ms: ms(g.time_to_first_token),
                prompt_ms: g.prompt_time.map(ms),
                total_ms: ms(g.total_time),
                decode_tokens_per_second,
            },
        }
    }
}

pub fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let config = args.decoder.config();
    let mut fixes = Vec::new();
    let mut out = std::io::stdout().lock();

    let spec = match args.world.as_slice() {
        [model, vocab] => WorldSpec::Files { model, vocab },
        [] => WorldSpec::Default,
        _ => anyhow::bail!("doctor takes a world model and its vocab, or nothing"),
    };
    let options = LoadOptions {
        device: args.device.device,
        ..Default::default()
    };
    let mut bridge_dim = None;
    match spec.load(&options) {
        Ok(world) => {
            bridge_dim = Some(world.config().bridge_dim);
            writeln!(out, "world model:   {}", describe_world(&world))?;
            if let Some(why) = world.cpu_fallback() {
                writeln!(out, "               on the CPU: {why}")?;
            }
        }
        Err(err) => {
            writeln!(out, "world model:   cannot load: {err:#}")?;
            let on_gpu = err.chain().any(|e| {
                matches!(
                    e.downcast_ref(),
                    Some(crate::world::WorldError::Cuda { .. })
                )
            });
            fixes.push(if on_gpu {
                "run the world model with --device cpu, or see docs/gpu.md for what the GPU needs".to_string()
            } else {
                "pass a valid model_world_*.safetensors and its vocab_world.txt, or none for the embedded default".to_string()
            });
        }
    }

    let found = discovery::find_model(config.model.as_deref(), &config.search_root);
    match &found {
        Ok(Some(path)) => {
            let how = if config.model.is_some() {
                "JEPA_DECODER_MODEL"
            } else {
                "found under ./models"
            };
            writeln!(out, "decoder model: {} ({how})", path.display())?;
        }
        Ok(None) => {
            writeln!(
                out,
                "decoder model: none (JEPA_DECODER_MODEL unset, no .gguf under ./models)"
            )?;
            fixes.push("put a .gguf under ./models (`make models` fetches SmolLM2-135M-Instruct) or set JEPA_DECODER_MODEL".to_string());
        }
        Err(err) => {
            writeln!(out, "decoder model: {err}")?;
            fixes.push("fix or unset JEPA_DECODER_MODEL".to_string());
        }
    }
    let backend = match (&found, config.backend) {
        (Ok(Some(_)), kind) => kind,
        _ => BackendKind::Stub,
    };
    let why = match (
        config.backend,
        args.decoder.backend,
        args.decoder.bin().is_some(),
    ) {
        (_, Some(_), _) => "JEPA_DECODER_BACKEND",
        (BackendKind::Subprocess, None, true) => "JEPA_DECODER_BIN is set",
        _ => "default",
    };
    let stub_note = if backend == BackendKind::Stub && config.backend != BackendKind::Stub {
        " -> stub, as there is no model"
    } else {
        ""
    };
    writeln!(
        out,
        "backend:       {} ({why}){stub_note}",
        config.backend.name()
    )?;
    match which::which(&config.bin) {
        Ok(path) => writeln!(out, "decoder bin:   {} ({})", config.bin, path.display())?,
        Err(_) => {
            writeln!(
                out,
                "decoder bin:   {} not found on PATH (only the subprocess backend needs it)",
                config.bin
            )?;
            if config.backend == BackendKind::Subprocess {
                fixes.push("install or build llama.cpp's llama-completion, or set JEPA_DECODER_BIN to its full path".to_string());
            }
        }
    }
    let gpu = decoder::llama::gpu_offload_supported();
    // RPC servers are registered (and reached) only when a model loads.
    let rpc = !config.rpc.is_empty();
    writeln!(
        out,
        "llama.cpp:     linked in-process; {}",
        match (gpu, rpc) {
            (true, _) => "GPU offload available".to_string(),
            (false, true) => format!(
                "layers go to the RPC servers {} (reached when a model loads)",
                config.rpc.join(", ")
            ),
            (false, false) => "CPU only (no GPU found, and no RPC server given)".to_string(),
        }
    )?;
    let ngl_note = if gpu || rpc || config.ngl == 0 {
        ""
    } else {
        " (ignored: CPU only)"
    };
    writeln!(out, "GPU layers:    {}{ngl_note}", config.ngl)?;
    for line in gpu_report(args.device.device) {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "threads:       {} (physical cores: {})",
        config.threads,
        decoder::config::physical_cores()
    )?;
    writeln!(
        out,
        "context:       {} tokens; conditioning mode {}, format {}",
        config.ctx,
        match args.decoder.cond_mode {
            Some(mode) => format!("{} (JEPA_DECODER_COND_MODE / --cond-mode)", mode.name()),
            None => {
                // What the engine will pick (the projector's fit to the
                // GGUF's width is checked only when the model loads).
                let given = args.decoder.projector().ok().flatten();
                let projector = given.clone().unwrap_or_else(Projector::embedded);
                let model = found.as_ref().ok().and_then(|m| m.as_deref());
                let mode = match (backend, bridge_dim) {
                    (BackendKind::Llama, Some(bridge)) => {
                        default_mode(Some(&projector), given.is_some(), model, bridge)
                    }
                    _ => CondMode::Text,
                };
                let why = match mode {
                    CondMode::Prefix => "a projector was made for this GGUF and world model",
                    _ => "no projector was made for this setup",
                };
                format!("{} (the default: {why})", mode.name())
            }
        },
        args.decoder.cond_format.name()
    )?;
    match args.decoder.projector() {
        Ok(Some(p)) => writeln!(
            out,
            "projector:     {} (K={}, rows of {}, for {})",
            p.source(),
            p.k(),
            p.n_embd(),
            p.gguf_name()
        )?,
        Ok(None) => writeln!(
            out,
            "projector:     embedded, fitted for SmolLM2-135M-Instruct (K=4; used where the decoder takes rows of 576)"
        )?,
        Err(err) => {
            writeln!(out, "projector:     {err}")?;
            fixes.push("fix or unset TOFY_PROJECTOR / --projector".to_string());
        }
    }
    match args.decoder.control() {
        Ok(Some((map, strength))) => {
            let (start, end) = map.control_layers().unwrap_or_default();
            writeln!(
                out,
                "control map:   {} (a direction of {} at layers {start}-{end}, strength {strength}, for {})",
                map.source(),
                map.n_embd(),
                map.gguf_name()
            )?
        }
        Ok(None) if args.decoder.cond_mode == Some(CondMode::Cvec) => {
            writeln!(out, "control map:   none, but the mode is cvec")?;
            fixes.push(
                "make a control map with `tofy fit-control` and pass --control FILE (TOFY_CONTROL)"
                    .to_string(),
            );
        }
        Ok(None) => writeln!(out, "control map:   none (cvec mode needs --control FILE)")?,
        Err(err) => {
            writeln!(out, "control map:   {err}")?;
            fixes.push("fix or unset TOFY_CONTROL / --control".to_string());
        }
    }
    if fixes.is_empty() {
        writeln!(out, "ok: nothing to fix")?;
    } else {
        for fix in &fixes {
            writeln!(out, "to fix: {fix}")?;
        }
    }
    Ok(())
}

fn describe_world(world: &WorldModel) -> String {
    format!(
        "{} ({}; on {})",
        world.model_path().display(),
        world.config().summary(),
        world.device_description()
    )
}

/// The doctor's GPU lines: the GPU and driver, llama.cpp's CUDA module, the
/// devices llama.cpp registered, NVRTC.
#[cfg(feature = "cuda")]
fn gpu_report(device: crate::world::Device) -> Vec<String> {
    use crate::decoder::llama::modules;
    use crate::world::{Device, cuda};
    let ordinal = match device {
        Device::Cuda(n) => n,
        Device::Auto | Device::Cpu => 0,
    };
    let gpu = match cuda::probe(ordinal) {
        Ok(info) => info.to_string(),
        Err(why) => format!("none usable: {why}"),
    };
    let module = match modules::cuda_module() {
        Ok(path) => format!("libggml-cuda.so loads ({})", path.display()),
        Err(why) => format!("libggml-cuda.so does not load: {why}"),
    };
    let nvrtc = match cuda::compile::nvrtc_version() {
        Ok((major, minor)) => format!("{major}.{minor}"),
        Err(why) => why,
    };
    // The modules failing to load at all (no CPU variant beside tofy) hides every device.
    let devices = match decoder::llama::backend() {
        Ok(_) => modules::devices().join(", "),
        Err(err) => format!("none: {err}"),
    };
    vec![
        format!("GPU:           {gpu}"),
        format!("llama.cpp CUDA: {module}"),
        format!("ggml devices:  {devices}"),
        format!("NVRTC:         {nvrtc}"),
    ]
}

#[cfg(not(feature = "cuda"))]
fn gpu_report(_device: crate::world::Device) -> Vec<String> {
    vec![
        "GPU:           not built in (for NVIDIA GPUs, build with `make cuda`: docs/gpu.md)".into(),
    ]
}
