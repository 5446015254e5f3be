//! Where the world model runs: `--device cpu|cuda[:N]` (env `TOFY_DEVICE`),
//! or, when neither is given, the first GPU if this build has CUDA and the
//! machine a usable GPU, else the CPU.

use std::fmt;
use std::str::FromStr;

/// A device request, as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// cuda:0 when it can be used, else the CPU (with a notice saying why,
    /// in a build that has CUDA).
    #[default]
    Auto,
    Cpu,
    /// `cuda:N`; failing to use it is an error, never a silent fallback.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("invalid device '{text}': expected cpu, cuda, cuda:N (N = 0, 1, ...) or auto")
                }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// What `--device cuda` says in a build without CUDA.
pub const NOT_BUILT: &str = "this tofy was built without CUDA support: build it with `make cuda` \
     (cargo build --release --features cuda), or use --device cpu";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_write() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("CUDA".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert_eq!(" auto ".parse(), Ok(Device::Auto));
        for bad in ["cuda:", "cuda:-1", "tpu", "cuda:x", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains("expected cpu, cuda"), "{bad}: {err}");
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }
}
