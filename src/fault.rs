//! Faults: a caught panic's payload as a message, and the fault-injection
//! points the fault tests use to make the server's threads panic.
//!
//! The points exist only in builds with the `fault-injection` feature
//! (`make test` turns it on; `make build` and `make demo` do not): there a
//! request whose text holds `<tofy:fault:POINT>` panics at that point, and
//! `TOFY_FAULT_LOAD_MS` holds a model load in llama.cpp's progress callback
//! (so a test can signal a server mid-load).
//! Elsewhere [`inject`] is an empty inline function.

use std::any::Any;

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The server's blocking thread for one request (before the world model).
    Request,
    /// The llama.cpp worker thread, as it admits the request to a slot.
    Worker,
    /// The world model's batching thread, in the request's forward pass.
    World,
}

impl Point {
    pub fn marker(self) -> &'static str {
        match self {
            Self::Request => "<tofy:fault:request>",
            Self::Worker => "<tofy:fault:worker>",
            Self::World => "<tofy:fault:world>",
        }
    }
}

/// Panics when the request's text (`text()`, called only in
/// fault-injection builds) asks for a fault at `point`.
#[cfg(feature = "fault-injection")]
pub fn inject<S: AsRef<str>>(point: Point, text: impl FnOnce() -> S) {
    if text().as_ref().contains(point.marker()) {
        panic!("injected fault at {point:?}");
    }
}

/// Nothing, and `text` is never called: this build has no fault-injection
/// points, and a shipped worker must not build strings for them.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn inject<S: AsRef<str>>(_point: Point, _text: impl FnOnce() -> S) {}

/// The model load's pause (fault-injection builds): with
/// `TOFY_FAULT_LOAD_MS` set, llama.cpp's first progress report during a
/// model load waits that many milliseconds, or until `cancel` is set, so a
/// test can signal a server while its model is still loading.
#[cfg(feature = "fault-injection")]
pub fn slow_load(cancel: &std::sync::atomic::AtomicBool) {
    let Some(ms) = std::env::var("TOFY_FAULT_LOAD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < deadline && !cancel.load(std::sync::atomic::Ordering::Acquire)
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Nothing: this build has no fault-injection points.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn slow_load(_cancel: &std::sync::atomic::AtomicBool) {}

/// What a panic said (its `&str` or `String` payload).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with no message".to_string()
    }
}
