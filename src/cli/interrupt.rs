//! Ctrl-C for the long commands (`tofy infer-agent`, `tofy train-world`):
//! the first SIGINT or SIGTERM sets a flag that the command reads as a
//! cancel (a generation and a model load stop at the decoder's next step
//! and let the llama.cpp worker free its context; a training run ends its
//! step and writes its checkpoint), and the command exits with the shell's
//! code for the signal (130, 143) instead of dying by it. A second signal
//! exits at once, through `_exit` (no destructor runs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

/// The command was stopped by a signal: exit `128 + signal`, silently
/// (the shell knows what Ctrl-C means).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by signal {signal}")]
pub struct Interrupted {
    pub signal: i32,
}

impl Interrupted {
    pub fn exit_code(&self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(1)
    }
}

/// The installed handlers' flags.
pub struct Interrupt {
    flag: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl Interrupt {
    /// Installs the handlers for SIGINT and SIGTERM.
    pub fn install() -> std::io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let signal = Arc::new(AtomicUsize::new(0));
        for number in [SIGINT, SIGTERM] {
            // Registered first, so it runs before the flag is set: only a
            // second signal finds the flag set and exits.
            signal_hook::flag::register_conditional_shutdown(
                number,
                128 + number,
                Arc::clone(&flag),
            )?;
            signal_hook::flag::register_usize(number, Arc::clone(&signal), number as usize)?;
            signal_hook::flag::register(number, Arc::clone(&flag))?;
        }
        Ok(Self { flag, signal })
    }

    /// The flag to hand to a generation and a model load as their cancel.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.flag)
    }

    /// The signal that came, if one did.
    pub fn caught(&self) -> Option<Interrupted> {
        self.flag.load(Ordering::Acquire).then(|| Interrupted {
            signal: i32::try_from(self.signal.load(Ordering::Acquire)).unwrap_or(SIGINT),
        })
    }
}
