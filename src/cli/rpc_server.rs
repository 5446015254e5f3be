//! `tofy rpc-server`: this host's devices (its GPUs, else its CPU) served to
//! llama.cpp RPC clients, so that a `tofy serve --rpc host:port,...`
//! elsewhere can put a model's layers here (deploy/README.md).
//!
//! llama.cpp's server loop never returns and cannot be asked to stop, so
//! it runs on a thread of its own while the main thread waits for SIGTERM
//! or SIGINT, then leaves through `_exit` with status 0: returning from
//! `main` would run ggml's destructors beside the live loop. The server
//! keeps nothing that could be lost (clients reconnect elsewhere).

use anyhow::Context;
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::decoder::config::physical_cores;
use crate::decoder::llama::rpc;

#[derive(Debug, Args)]
pub struct RpcServerArgs {
    /// Address to listen on. The protocol has no authentication: keep it on a private
    /// network (0.0.0.0 exposes the device to anyone who can reach this host).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 50052, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// CPU threads, when the CPU is the device served [default: physical cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// A directory where tensors are kept between runs, so a client that loads the same
    /// model again sends only their hashes.
    #[arg(long, value_name = "DIR")]
    cache: Option<std::path::PathBuf>,
}

pub fn run(args: RpcServerArgs) -> anyhow::Result<()> {
    // Bind-check first, for a one-line error (ggml prints its own and returns).
    std::net::TcpListener::bind((args.host.as_str(), args.port)).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}:{} ({e}); pass another --port, or a --host of this machine",
            args.host,
            args.port
        )
    })?;
    if let Some(dir) = &args.cache {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create the cache directory {}: {e}", dir.display())
        })?;
    }
    let threads = args.threads.map_or_else(physical_cores, |t| t as usize);
    let cache = args
        .cache
        .as_deref()
        .map(|d| d.to_string_lossy().into_owned());
    let endpoint = format!("{}:{}", args.host, args.port);
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).context("installing the SIGTERM/SIGINT handlers")?;
    let wake = signals.handle();
    let server = std::thread::Builder::new()
        .name("tofy-rpc".into())
        .spawn(move || {
            let served = rpc::serve(&endpoint, threads, cache.as_deref());
            // It returns only when it could not start: wake the main thread.
            wake.close();
            served
        })?;
    if let Some(signal) = signals.forever().next() {
        let name = if signal == SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        };
        crate::exit::now(0, &format!("tofy rpc-server: {name}; stopped"));
    }
    match server.join() {
        Ok(served) => Ok(served?),
        Err(_) => anyhow::bail!("the RPC server thread panicked"),
    }
}
