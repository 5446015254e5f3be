//! llama.cpp's RPC backend over loopback: SmolLM2's layers split over two
//! real `tofy rpc-server` processes give the same greedy reply as a local
//! run, and an unreachable server is one readable error line.

mod common;

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{fails, smollm2};

/// A `tofy rpc-server` on a loopback port, killed on drop.
struct RpcServer {
    child: Child,
    endpoint: String,
}

impl RpcServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_tofy"))
            .args(["rpc-server", "--port", &port.to_string(), "--threads", "1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start tofy rpc-server");
        let server = Self {
            child,
            endpoint: format!("127.0.0.1:{port}"),
        };
        // Ready when it accepts a connection (one that sends nothing is
        // served as a client that left at once). A hang guard, not a timing.
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(&server.endpoint).is_err() {
            assert!(Instant::now() < deadline, "rpc-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn infer(env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tofy"));
    for (key, _) in std::env::vars() {
        if key.starts_with("JEPA_DECODER_") || key.starts_with("TOFY_") {
            cmd.env_remove(key);
        }
    }
    cmd.args([
        "infer-agent",
        "Name three colours of the rainbow.",
        "--json",
        "--max-new-tokens",
        "24",
    ])
    .env("JEPA_DECODER_MODEL", smollm2())
    .env("JEPA_DECODER_THREADS", "1")
    .env("JEPA_DECODER_TEMP", "0")
    .envs(env.iter().copied())
    .output()
    .expect("run tofy")
}

fn reply(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    value["reply"].as_str().unwrap().to_string()
}

#[test]
fn a_model_split_over_two_rpc_servers_replies_as_a_local_run() {
    let local = reply(&infer(&[("JEPA_DECODER_NGL", "0")]));
    assert!(!local.trim().is_empty());

    let (a, b) = (RpcServer::start(), RpcServer::start());
    let endpoints = format!("{},{}", a.endpoint, b.endpoint);
    let out = infer(&[
        ("JEPA_DECODER_NGL", "99"),
        ("TOFY_RPC", &endpoints),
        // llama.cpp's own log says where the layers went.
        ("TOFY_LLAMA_LOG", "1"),
    ]);
    let split = reply(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    for server in [&a, &b] {
        assert!(
            log.lines()
                .any(|l| l.contains(&server.endpoint) && l.contains("model buffer size")),
            "no layers on {}: {log}",
            server.endpoint
        );
    }
    assert!(
        !log.contains("JEPA_DECODER_NGL=99 ignored"),
        "NGL is not ignored with RPC servers: {log}"
    );
    assert_eq!(
        split, local,
        "greedy replies must not depend on where layers run"
    );
}

#[test]
fn an_unreachable_rpc_server_is_one_line() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    let line = fails(infer(&[("TOFY_RPC", &format!("127.0.0.1:{port}"))]));
    assert!(line.contains("cannot reach the RPC server"), "{line}");
    for bad in ["no-port-here", "[::1]:50052"] {
        let line = fails(infer(&[("TOFY_RPC", bad)]));
        assert!(line.contains("host:port"), "{line}");
    }
}

#[test]
fn an_rpc_server_stops_on_sigterm_with_status_0() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut server = RpcServer::start();
        common::signal(&server.child, signal);
        let status = common::exit_status(&mut server.child, "tofy rpc-server");
        assert_eq!(status.code(), Some(0), "{status}");
    }
}
