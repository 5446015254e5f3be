//! llama.cpp's RPC backend: a model's layers spread over other processes or
//! hosts, each running an RPC server (`tofy rpc-server`, or llama.cpp's own
//! `rpc-server` of the same protocol version).
//!
//! The backend is compiled in (`GGML_RPC` in `.cargo/config.toml`) and
//! reached through ggml's registry by name, as llama.cpp's `--rpc` does:
//! its two entry points are proc addresses of the "RPC" registry, so the
//! bindings need no RPC header. Registered servers' devices count as GPUs:
//! llama.cpp puts them first in a model's device list, and `--ngl` layers
//! are split over them.

use std::ffi::{CStr, CString, c_char};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use llama_cpp_sys_2 as sys;

use crate::decoder::DecoderError;

/// `ggml_backend_rpc_add_server` (ggml-rpc.h).
type AddServer = unsafe extern "C" fn(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
/// `ggml_backend_rpc_start_server` (ggml-rpc.h).
type StartServer = unsafe extern "C" fn(
    endpoint: *const c_char,
    cache_dir: *const c_char,
    n_threads: usize,
    n_devices: usize,
    devices: *mut sys::ggml_backend_dev_t,
);

/// How long a server may take to accept a connection before it counts as
/// down. llama.cpp aborts the process when it cannot connect, so every
/// endpoint is probed first.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Endpoints registered so far: registering one twice would add its
/// devices twice.
static REGISTERED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// One of the RPC registry's functions, by name.
fn proc_address(name: &CStr) -> Result<*mut std::ffi::c_void, DecoderError> {
    super::backend()?;
    // SAFETY: plain lookups in ggml's registry, which backend() has set up;
    // the names are NUL-terminated.
    let address = unsafe {
        let registry = sys::ggml_backend_reg_by_name(c"RPC".as_ptr());
        if registry.is_null() {
            return Err(DecoderError::Rpc(
                "this build of llama.cpp has no RPC backend; build with GGML_RPC=ON (.cargo/config.toml)".into(),
            ));
        }
        sys::ggml_backend_reg_get_proc_address(registry, name.as_ptr())
    };
    if address.is_null() {
        return Err(DecoderError::Rpc(format!(
            "llama.cpp's RPC backend has no {}",
            name.to_string_lossy()
        )));
    }
    Ok(address)
}

/// Registers each `host:port` RPC server, so that models loaded from now on
/// put their offloaded layers there. Each must be up: it is probed first.
pub fn add_servers(endpoints: &[String]) -> Result<(), DecoderError> {
    if endpoints.is_empty() {
        return Ok(());
    }
    let address = proc_address(c"ggml_backend_rpc_add_server")?;
    // SAFETY: the registry returned this address for this name, whose C
    // signature `AddServer` spells out.
    let add: AddServer = unsafe { std::mem::transmute(address) };
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    for endpoint in endpoints {
        if registered.contains(endpoint) {
            continue;
        }
        probe(endpoint)?;
        let c_endpoint = CString::new(endpoint.as_str()).map_err(|_| {
            DecoderError::Rpc(format!("RPC endpoint '{endpoint}' holds a NUL byte"))
        })?;
        // SAFETY: a NUL-terminated endpoint that answered a TCP connect;
        // ggml copies the string.
        let registry = unsafe { add(c_endpoint.as_ptr()) };
        if registry.is_null() {
            return Err(DecoderError::Rpc(format!(
                "the RPC server at {endpoint} reports no devices"
            )));
        }
        // SAFETY: a registry ggml just made; registering adds its devices.
        unsafe { sys::ggml_backend_register(registry) };
        registered.push(endpoint.clone());
    }
    Ok(())
}

/// Fails unless `endpoint` accepts a TCP connection.
fn probe(endpoint: &str) -> Result<(), DecoderError> {
    let unreachable = |why: String| {
        DecoderError::Rpc(format!(
            "cannot reach the RPC server at {endpoint}: {why}; start `tofy rpc-server --host HOST --port PORT` there, or fix --rpc / TOFY_RPC"
        ))
    };
    let addresses = endpoint
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?;
    let mut last = "the name resolves to no IPv4 address".to_string();
    // IPv4 only, as llama.cpp connects (gethostbyname).
    for address in addresses.filter(std::net::SocketAddr::is_ipv4) {
        match TcpStream::connect_timeout(&address, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

/// Whether a GPU-like device is registered (a GPU, an integrated GPU, or a
/// registered RPC server): what `--ngl` layers can go to.
pub fn offload_device_present() -> bool {
    if super::backend().is_err() {
        return false;
    }
    // SAFETY: ggml's device list, read after backend() set it up; the
    // indices are below its count.
    unsafe {
        (0..sys::ggml_backend_dev_count()).any(|i| {
            let kind = sys::ggml_backend_dev_type(sys::ggml_backend_dev_get(i));
            kind == sys::GGML_BACKEND_DEVICE_TYPE_GPU || kind == sys::GGML_BACKEND_DEVICE_TYPE_IGPU
        })
    }
}

/// Serves this machine's devices (its GPUs, else its CPU) to RPC clients on
/// `endpoint` until the process ends. Clients are served one at a time.
/// `cache_dir` lets a client skip sending tensors the server already holds.
pub fn serve(endpoint: &str, threads: usize, cache_dir: Option<&str>) -> Result<(), DecoderError> {
    let address = proc_address(c"ggml_backend_rpc_start_server")?;
    // SAFETY: as in `add_servers`, for `StartServer`.
    let start: StartServer = unsafe { std::mem::transmute(address) };
    // SAFETY: reads of ggml's device list, as in `offload_device_present`.
    let mut devices: Vec<sys::ggml_backend_dev_t> = unsafe {
        let all: Vec<_> = (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .collect();
        let gpus: Vec<_> = all
            .iter()
            .copied()
            .filter(|&d| sys::ggml_backend_dev_type(d) == sys::GGML_BACKEND_DEVICE_TYPE_GPU)
            .collect();
        if gpus.is_empty() {
            all.into_iter()
                .filter(|&d| sys::ggml_backend_dev_type(d) == sys::GGML_BACKEND_DEVICE_TYPE_CPU)
                .collect()
        } else {
            gpus
        }
    };
    if devices.is_empty() {
        return Err(DecoderError::Rpc("no device to serve".into()));
    }
    let c_endpoint = CString::new(endpoint)
        .map_err(|_| DecoderError::Rpc(format!("endpoint '{endpoint}' holds a NUL byte")))?;
    let c_cache = cache_dir
        .map(CString::new)
        .transpose()
        .map_err(|_| DecoderError::Rpc("the cache directory holds a NUL byte".into()))?;
    // SAFETY: NUL-terminated strings and a device array that outlive the
    // call (it returns only when the server fails to start).
    unsafe {
        start(
            c_endpoint.as_ptr(),
            c_cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            threads,
            devices.len(),
            devices.as_mut_ptr(),
        );
    }
    Err(DecoderError::Rpc(format!(
        "the RPC server could not listen on {endpoint} (address in use, or not local?)"
    )))
}
