//! llama.cpp's backends as modules loaded at run time: the `cuda` build
//! (llama-cpp-2's `dynamic-backends`). The CPU variants, CUDA and RPC are
//! `libggml-*.so` files that ggml dlopens; tofy itself links no CUDA library,
//! so it starts where there is no driver and the CPU serves.
//!
//! The modules are looked for in `TOFY_BACKEND_DIR`, else beside the
//! executable (the archive `make cuda` packs), else in the build's own
//! output directory. A static build (no `cuda` feature) has its backends
//! compiled in and never calls this.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

use crate::decoder::DecoderError;

/// The directory holding `libggml-cpu-*.so`, by the order in the module docs.
pub fn module_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TOFY_BACKEND_DIR") {
        return Some(PathBuf::from(dir));
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|dir| has_cpu_module(dir));
    beside_exe.or_else(|| llama_cpp_sys_2::BACKENDS_DIR.map(PathBuf::from))
}

fn has_cpu_module(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libggml-cpu") && name.ends_with(".so")
        })
    })
}

/// Loads every module in [`module_dir`]; at least one must register (the
/// CPU's), or no model could load.
pub fn load() -> Result<(), DecoderError> {
    let dir = module_dir().ok_or_else(|| {
        DecoderError::Backend(
            "llama.cpp's backend modules (libggml-cpu-*.so) were not found beside tofy: keep the files of the `make cuda` archive together, or set TOFY_BACKEND_DIR".into(),
        )
    })?;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| DecoderError::Backend(format!("{}: a NUL byte in the path", dir.display())))?;
    // SAFETY: a NUL-terminated path; ggml copies what it needs.
    unsafe { sys::ggml_backend_load_all_from_path(path.as_ptr()) };
    // SAFETY: reads ggml's registry count, set up by the call above.
    if unsafe { sys::ggml_backend_reg_count() } == 0 {
        return Err(DecoderError::Backend(format!(
            "no llama.cpp backend module loaded from {}: it needs libggml-cpu-*.so (and libggml-cuda.so for the GPU); set TOFY_BACKEND_DIR to the folder holding them",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether `libggml-cuda.so` can be loaded, and if not, the loader's reason
/// (ggml skips a module that fails to load without saying why).
pub fn cuda_module() -> Result<PathBuf, String> {
    let dir = module_dir().ok_or("no backend module directory")?;
    let path = dir.join("libggml-cuda.so");
    if !path.exists() {
        return Err(format!("{} is missing", path.display()));
    }
    // SAFETY: loading runs the module's initialisers, which ggml itself runs
    // when it loads the module; nothing is resolved or called here.
    match unsafe { libloading::Library::new(&path) } {
        Ok(_) => Ok(path),
        // The loader's own words (which library is missing) are the source.
        Err(err) => {
            Err(std::error::Error::source(&err)
                .map_or_else(|| err.to_string(), ToString::to_string))
        }
    }
}

/// The registered devices, as `NAME (description)`.
pub fn devices() -> Vec<String> {
    // SAFETY: ggml's device list and its static strings; indices below its count.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                let text = |p: *const std::ffi::c_char| {
                    if p.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(p).to_string_lossy().into_owned()
                    }
                };
                format!(
                    "{} ({})",
                    text(sys::ggml_backend_dev_name(dev)),
                    text(sys::ggml_backend_dev_description(dev))
                )
            })
            .collect()
    }
}
