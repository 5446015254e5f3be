//! NVRTC compilation of `kernels.cu`, cached on disk.
//!
//! The kernels are compiled at load time for the device at hand, by the
//! NVRTC that sits beside its driver, so the PTX never asks for a newer ISA
//! than the driver reads. Compiling takes a few hundred milliseconds; the PTX
//! is kept under the user's cache directory, named by a hash of the source,
//! the target and the NVRTC version, so a later start skips it. A cache that
//! cannot be read or written is only a slower start.
//!
//! Nothing here needs a GPU: `tests/cuda.rs` compiles the kernels on a
//! machine that has only the PyPI NVRTC wheel.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx};
use sha2::{Digest, Sha256};

/// The kernels' CUDA source.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every `extern "C"` kernel in [`SOURCE`], which a load resolves up front.
pub const KERNELS: [&str; 5] = ["embed", "layer_norm", "attention", "bias_act", "mean_pool"];

/// Whether libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: dlopens the candidate names, resolving nothing.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_present() {
        return Err(no_nvrtc());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters, written by the call.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {status:?}"));
    }
    Ok((major, minor))
}

/// PTX for compute capability `major.minor`, from the user's cache or
/// compiled now.
pub fn ptx_for(major: i32, minor: i32) -> Result<Ptx, String> {
    ptx_cached(cache_dir().as_deref(), major, minor)
}

/// [`ptx_for`] with the cache in `cache` (none: always compile).
pub fn ptx_cached(cache: Option<&Path>, major: i32, minor: i32) -> Result<Ptx, String> {
    let version = nvrtc_version()?;
    let arch = format!("compute_{major}{minor}");
    let key = {
        let mut hash = Sha256::new();
        hash.update(SOURCE.as_bytes());
        hash.update(format!("{arch} nvrtc {}.{}", version.0, version.1).as_bytes());
        hash.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let cached = cache.map(|dir| dir.join(format!("world-{arch}-{key}.ptx")));
    if let Some(text) = cached
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
    {
        return Ok(Ptx::from_src(text));
    }
    let ptx = compile(&arch)?;
    if let Some(path) = &cached {
        // Written aside and renamed, so a concurrent start never reads half a file.
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let written = path
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, ptx.to_src()).is_ok()
            && std::fs::rename(&tmp, path).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

/// Compiles [`SOURCE`] for a virtual architecture such as `compute_90`.
pub fn compile(arch: &str) -> Result<Ptx, String> {
    if !nvrtc_present() {
        return Err(no_nvrtc());
    }
    let options = CompileOptions {
        name: Some("tofy_world.cu".into()),
        options: vec![format!("--gpu-architecture={arch}")],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => format!(
            "NVRTC could not compile the world-model kernels for {arch}:\n{}",
            log.to_string_lossy()
        ),
        other => format!("NVRTC failed: {other}"),
    })
}

/// `$TOFY_KERNEL_CACHE`, else `$XDG_CACHE_HOME/tofy/kernels`, else
/// `~/.cache/tofy/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TOFY_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tofy").join("kernels"))
}

fn no_nvrtc() -> String {
    "libnvrtc.so.13 not found (CUDA's NVRTC, which compiles the world-model kernels): install the \
     CUDA 13 toolkit or the nvidia-cuda-nvrtc wheel and put its lib/ on LD_LIBRARY_PATH"
        .to_string()
}
