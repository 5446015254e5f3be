//! Faults injected into a real `tofy serve` (feature `fault-injection`,
//! which `make test` turns on): a panic while handling one request, or in
//! the world model's batch, fails that request alone; the llama worker's
//! death turns `/health` to 503 with the reason and the server exits 1,
//! for its supervisor to restart it. A SIGTERM while the model loads (held
//! in the load by `TOFY_FAULT_LOAD_MS`) cancels the load and exits 0.

mod common;

use common::server::{Server, chat};
use serde_json::Value;
use tofy::fault::Point;

fn poisoned(point: Point) -> Value {
    chat(&format!("Hello {}", point.marker()), 4)
}

#[test]
fn a_panicking_request_or_world_batch_fails_only_that_request() {
    let server = Server::start(&["--parallel", "2"], &[]);
    for point in [Point::Request, Point::World] {
        let (status, body) = server.post("/v1/chat/completions", &poisoned(point));
        assert_eq!(status, 500, "{point:?}: {body}");
        assert_eq!(body["error"]["type"], "server_error");
        server.wait_for_log(&["injected fault at", &format!("{point:?}")]);
        let (status, body) = server.post("/v1/chat/completions", &chat("Hi", 2));
        assert_eq!(status, 200, "after {point:?}: {body}");
    }
    // A poisoned prompt in a world-model batch with others: theirs go on.
    std::thread::scope(|scope| {
        let replies: Vec<_> = (0..4)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let body = if i == 0 {
                        poisoned(Point::World)
                    } else {
                        chat("Hi", 2)
                    };
                    server.post("/v1/chat/completions", &body).0
                })
            })
            .collect();
        let statuses: Vec<u16> = replies.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(statuses, [500, 200, 200, 200]);
    });
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn a_dead_worker_fails_health_and_the_server_exits_non_zero() {
    let mut server = Server::start(&[], &[]);
    let (status, body) = server.post("/v1/chat/completions", &poisoned(Point::Worker));
    assert!(status == 500 || status == 503, "{body}");
    let (status, health) = server.get_or_gone("/health");
    if let Some(status) = status {
        // Still shutting down: it says why.
        assert_eq!(status, 503, "{health}");
        assert!(health.contains("panicked"), "{health}");
    }
    let exit = server.exit_status();
    assert_eq!(exit.code(), Some(1), "{exit}");
    server.wait_for_log(&["worker thread panicked"]);
}

#[test]
fn sigterm_while_the_model_loads_cancels_the_load_and_exits_0() {
    // The load pauses in llama.cpp's progress callback for ten minutes (a
    // fault-injection point) unless it is cancelled: only the cancel can
    // end this test within the two-minute hang guard.
    let mut server = Server::spawn(
        &["serve", "127.0.0.1:0"],
        &[("TOFY_FAULT_LOAD_MS", "600000")],
    );
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("loading"), "{body}");
    server.signal(libc::SIGTERM);
    let status = server.exit_status();
    assert!(status.success(), "{status}");
    server.wait_for_log(&["stopped before the model finished loading"]);
    assert!(
        !server.log().iter().any(|l| l.starts_with("error")),
        "{:?}",
        server.log()
    );
}
