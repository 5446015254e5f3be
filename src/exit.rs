//! Leaving the process when a native thread cannot be stopped in time.
//!
//! Returning from `main` runs the C++ static destructors of ggml and
//! llama.cpp (and the CUDA runtime's); beside a thread still inside a
//! decode or a kernel they crash the process (a SIGSEGV at every timed-out
//! drain, before the worker learnt to stop). Everything that owns native
//! state is therefore stopped with a bound first (`Engine::shutdown`); when
//! that bound passes, or a native loop has no way to stop (llama.cpp's RPC
//! server), the process leaves through `_exit`: the kernel frees all, and no
//! destructor runs beside the live thread.

use std::io::Write;
use std::time::{Duration, Instant};

/// Writes `line` to stderr and ends the process with `code`, running no
/// destructor and no `atexit` handler.
pub fn now(code: i32, line: &str) -> ! {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
    let _ = stderr.flush();
    let _ = std::io::stdout().lock().flush();
    // SAFETY: `_exit` ends the process at once; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Polls `done` (every 5 ms) until it holds or `bound` has passed; whether
/// it held. The stops above wait this way: a join would hang on a thread
/// that never comes back, and then no `_exit` could follow.
pub fn within(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}
