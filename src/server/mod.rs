//! The OpenAI-compatible HTTP server (`tofy serve`), on actix-web.
//!
//! Routes (each also without the `/v1` prefix, since the seed tells
//! OpenCode users to use `http://localhost:8080` as the base URL):
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `POST /tokenize`, `POST /detokenize` (llama-server's shapes), plus
//! `GET /health` and `GET /metrics`.
//!
//! The server binds first and loads the engine (decoder, projector) behind
//! it, answering
//! `/health` with 503 until the model is ready. Every generation runs on a
//! blocking thread that feeds a channel; the HTTP side turns that channel
//! into one JSON reply or an SSE stream. A client that goes away (its
//! stream dropped, or its socket closed while it waits) cancels its
//! generation at the decoder's next step.
//! Concurrency is bounded: `--parallel` sequences decode together (the
//! llama backend batches them), `--queue` more may wait, and beyond that a
//! request gets 503 at once.
//!
//! However the server stops (drained, a drain timeout, a second signal, a
//! dead worker, a failed or cancelled load), `serve` stops the native
//! threads under it before it returns: a model load in progress is
//! cancelled, the llama.cpp worker ends its jobs and frees its context,
//! then the engine is dropped. Each has a bound; past it the process
//! leaves through [`crate::exit::now`] rather than run ggml's destructors
//! beside a live decode.
//!
//! Faults stay with their request: a panic while handling one fails that
//! request (500). The one fault that cannot is the llama worker's death:
//! `/health` turns 503 with the reason and the server shuts down with exit
//! status 1, for its supervisor to restart it (docs/server.md).
//!
//! Every response carries an `x-request-id` (the client's, when it sent a
//! sane one), and the log (`tracing`, on stderr) has one line per response
//! and one per generation under that id.

pub mod api;
mod embeds;
mod error;
mod generate;
mod metrics;
mod peer;
mod tokenize;
pub mod tools;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpMessage, HttpRequest, HttpResponse, HttpServer, ResponseError, web};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::decoder::{Decoder, Sampling};
use crate::engine::Engine;

pub use error::ApiError;
use metrics::Metrics;

/// The request parser, the messages-to-prompt path and the embedding-row
/// decoder, run as the handlers run them with no server and no model, for
/// [`crate::fuzzing`].
#[doc(hidden)]
pub mod fuzzing {
    use super::ApiError;

    /// A chat completions body: its checks, then its prompt (plain layout).
    pub fn chat(body: &[u8]) -> Result<String, ApiError> {
        super::generate::chat_prompt(body)
    }

    /// A `prompt_embeds` value (either encoding) for a 576-wide model with
    /// a 4096-token context: how many rows it holds.
    pub fn embeddings(value: &serde_json::Value) -> Result<usize, ApiError> {
        super::embeds::parse(value, &super::generate::FUZZ_LIMITS, "prompt_embeds")
            .map(|rows| rows.n_rows())
    }
}

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 16 << 20;
/// The model id clients use and replies carry.
pub const MODEL_ID: &str = "tofy";

/// How long the engine's threads get to stop once the server has: the
/// llama.cpp step in progress is cut by its abort callback, so stopping
/// takes milliseconds; a second signal is promised to stop within this.
const STOP_WITHIN: Duration = Duration::from_secs(2);
/// How long a model load gets to give up: llama.cpp asks between tensors,
/// but a context being created cannot be interrupted.
const LOAD_STOP_WITHIN: Duration = Duration::from_secs(10);

/// How `tofy serve` runs.
pub struct ServeOptions {
    /// Already bound, so that a busy port is an error before any loading.
    pub listener: TcpListener,
    /// Sequences decoded together.
    pub parallel: usize,
    /// Admitted requests that may wait for a sequence.
    pub queue: usize,
    /// Required as `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Sampling for parameters a request leaves out.
    pub sampling: Sampling,
    /// `max_tokens` when a request gives none (bounded by the context).
    pub max_tokens: usize,
    /// A comment on a stream that has sent nothing for this long.
    pub keep_alive: Duration,
    /// This replica's name (`/health`, the `replica` metrics label,
    /// `X-Tofy-Replica`).
    pub replica: String,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0:#}")]
    Load(anyhow::Error),
    #[error("stopped: {0}")]
    Fatal(String),
}

/// What every handler shares.
pub(crate) struct State {
    engine: OnceLock<Engine>,
    metrics: Metrics,
    /// Requests admitted and not yet finished (running or queued).
    in_flight: AtomicUsize,
    parallel: usize,
    queue: usize,
    /// The SHA-256 of `--api-key`: keys are compared as digests, in
    /// constant time, so neither a key's bytes nor its length leak
    /// through timing.
    api_key: Option<[u8; 32]>,
    sampling: Sampling,
    max_tokens: usize,
    keep_alive: Duration,
    replica: String,
    /// Set by SIGTERM/SIGINT: `/health` answers 503 and new generations
    /// are refused while the admitted ones finish.
    draining: AtomicBool,
    created: u64,
    /// Why the server can no longer serve, once it cannot.
    fatal: OnceLock<String>,
    /// Stops the server (set once it runs).
    handle: OnceLock<ServerHandle>,
}

impl State {
    fn engine(&self) -> Result<&Engine, ApiError> {
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the decoder model is still loading; retry shortly (GET /health says when it is ready)"))
    }

    fn decoder(&self) -> Result<&dyn Decoder, ApiError> {
        if let Some(reason) = self.fatal.get() {
            return Err(ApiError::unavailable(format!(
                "the server is shutting down: {reason}"
            )));
        }
        Ok(self.engine()?.decoder())
    }

    /// Why the server cannot serve, if it cannot: the worker died (noticed
    /// by a request, or now).
    fn failure(&self) -> Option<String> {
        self.fatal.get().cloned().or_else(|| {
            let engine = self.engine.get()?;
            engine.decoder().health().err()
        })
    }

    /// The server cannot go on: `/health` says why from now on, and the
    /// server stops (in-flight requests get their errors first) and exits
    /// non-zero.
    fn fail(&self, reason: String) {
        if self.fatal.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "the decoder cannot serve any more; shutting down");
            if let Some(handle) = self.handle.get() {
                // stop() sends its command at once; nobody awaits it.
                drop(handle.stop(true));
            }
        }
    }

    fn authorize(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or_default();
        if bool::from(Sha256::digest(given.as_bytes()).ct_eq(key)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    /// A place among the running or queued requests, or 503.
    fn admit(self: &Arc<Self>) -> Result<Admission, ApiError> {
        // Counted before the draining check, both SeqCst, pairing with
        // `drain`'s store-then-load: a request either sees the flag or is
        // seen in `in_flight`, never slips between the two.
        let ahead = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let admission = Admission(Arc::clone(self));
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable(format!(
                "replica {} is shutting down (draining); retry, and a load balancer will send the request to another replica",
                self.replica
            )));
        }
        let limit = self.parallel + self.queue;
        if ahead >= limit {
            return Err(ApiError::busy(format!(
                "server busy: {limit} requests are running or queued (--parallel {}, --queue {}); retry later",
                self.parallel, self.queue
            )));
        }
        Ok(admission)
    }

    /// (active, queued) sequences right now.
    fn load(&self) -> (usize, usize) {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let active = self
            .engine
            .get()
            .and_then(|e| e.decoder().active_sequences())
            .unwrap_or(in_flight)
            .min(in_flight);
        (active, in_flight - active)
    }
}

/// A request's place; released when its generation ends (not when its
/// client leaves: the sequence is busy until the decoder lets go).
pub(crate) struct Admission(Arc<State>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves until SIGINT/SIGTERM. `load_engine` runs behind the open port,
/// and gives up when the flag it gets is set (the server stopped before
/// the load finished: [`crate::decoder::DecoderError::LoadCancelled`]); if
/// it fails otherwise the server stops and its error is returned.
pub fn serve<F>(load_engine: F, options: ServeOptions) -> Result<(), ServeError>
where
    F: FnOnce(Arc<AtomicBool>) -> anyhow::Result<Engine> + Send + 'static,
{
    let state = Arc::new(State {
        engine: OnceLock::new(),
        metrics: Metrics::new(&options.replica),
        in_flight: AtomicUsize::new(0),
        parallel: options.parallel.max(1),
        queue: options.queue,
        api_key: options
            .api_key
            .filter(|k| !k.is_empty())
            .map(|k| Sha256::digest(k.as_bytes()).into()),
        sampling: options.sampling,
        max_tokens: options.max_tokens,
        keep_alive: options.keep_alive,
        replica: options.replica,
        draining: AtomicBool::new(false),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        fatal: OnceLock::new(),
        handle: OnceLock::new(),
    });
    let data = web::Data::from(Arc::clone(&state));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    // The loader sets its error before it stops the server, so the error is
    // there when `server.await` returns. (Unwrapping the Arc instead raced
    // the loader thread's own drop of its clone: a failed load could exit 0.)
    let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let cancel_load = Arc::new(AtomicBool::new(false));
    let (loader, served) = actix_web::rt::System::new().block_on(async {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .wrap(from_fn(observe))
                .configure(routes)
                .default_service(web::to(not_found))
        })
        .on_connect(peer::on_connect)
        .workers(workers)
        // SIGTERM/SIGINT are `drain_on_signal`'s: actix would stop at once.
        .disable_signals()
        .shutdown_timeout(5)
        .listen(options.listener)?
        .run();
        let handle = server.handle();
        let _ = state.handle.set(handle.clone());
        actix_web::rt::spawn(drain_on_signal(
            Arc::clone(&state),
            handle.clone(),
            options.drain_timeout,
        ));
        let (loader_state, loader_error, loader_cancel) = (
            Arc::clone(&state),
            Arc::clone(&load_error),
            Arc::clone(&cancel_load),
        );
        let loader = std::thread::Builder::new()
            .name("tofy-load".into())
            .spawn(move || match load_engine(loader_cancel) {
                Ok(engine) => {
                    let decoder = engine.decoder();
                    tracing::info!(
                        backend = decoder.backend().name(),
                        model = %decoder.model_path().map_or_else(String::new, |p| p.display().to_string()),
                        context = decoder.context_size().unwrap_or(0),
                        cond_mode = engine.mode().name(),
                        "decoder ready"
                    );
                    let _ = loader_state.engine.set(engine);
                }
                Err(err) => {
                    *loader_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                    // stop() sends its command at once; nobody awaits it.
                    // Graceful, so `server.await` returns only after every
                    // worker has logged its shutdown: the error is then the
                    // last line on stderr, as a CLI failure should be.
                    // Before load every request is answered at once (503),
                    // so this waits at most for an idle keep-alive client,
                    // bounded by the 5 s shutdown timeout.
                    drop(handle.stop(true));
                }
            })?;
        Ok::<_, std::io::Error>((loader, server.await))
    })?;
    // Nothing new reaches the engine now: stop what runs under it.
    cancel_load.store(true, Ordering::Release);
    stop_engine(state.as_ref(), &loader);
    let failed = load_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let fatal = state.fatal.get().cloned();
    release(state);
    served?;
    match (failed, fatal) {
        (Some(err), _) if is_cancelled_load(&err) => {
            tracing::info!("stopped before the model finished loading");
            Ok(())
        }
        (Some(err), _) => Err(ServeError::Load(err)),
        (None, Some(reason)) => Err(ServeError::Fatal(reason)),
        (None, None) => Ok(()),
    }
}

/// Waits for the loader (its load cancelled) and stops the engine's
/// threads, each within its bound; past a bound the process leaves at once.
fn stop_engine(state: &State, loader: &JoinHandle<()>) {
    if !crate::exit::within(LOAD_STOP_WITHIN, || loader.is_finished()) {
        crate::exit::now(
            1,
            &format!(
                "error: tofy serve: the model load did not stop within {} s; exiting without cleanup",
                LOAD_STOP_WITHIN.as_secs()
            ),
        );
    }
    if let Some(engine) = state.engine.get()
        && let Err(err) = engine.shutdown(STOP_WITHIN)
    {
        crate::exit::now(
            1,
            &format!("error: tofy serve: {err}; exiting without cleanup"),
        );
    }
}

/// Drops the server's state, and with it the engine (the model after its
/// context), once the request threads still finishing have let go of it.
/// One that holds on past the bound keeps it: the engine is then never
/// dropped, rather than dropped on that thread while the process exits.
fn release(state: Arc<State>) {
    crate::exit::within(STOP_WITHIN, || Arc::strong_count(&state) == 1);
    match Arc::try_unwrap(state) {
        Ok(state) => drop(state),
        Err(state) => {
            tracing::warn!(
                "a request thread still held the engine at exit; it is left to the operating system"
            );
            // Our count is kept, so the last other holder never drops it.
            std::mem::forget(state);
        }
    }
}

/// Whether a load failed because the server stopped during it.
fn is_cancelled_load(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<crate::decoder::DecoderError>(),
            Some(crate::decoder::DecoderError::LoadCancelled)
        )
    })
}

/// The first SIGTERM or SIGINT drains: `/health` turns 503 and new
/// generations are refused (503, for the balancer to retry elsewhere)
/// while the admitted ones finish, for at most `grace`; then the server
/// stops and `serve` returns Ok (exit 0). A second signal stops at once.
async fn drain_on_signal(state: Arc<State>, handle: ServerHandle, grace: Duration) {
    use actix_web::rt::signal::unix::{SignalKind, signal};
    use futures_util::future::{Either, select};
    use std::pin::pin;

    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(
            "could not install the SIGTERM/SIGINT handlers: a signal stops the server without draining"
        );
        return;
    };
    let mut next_signal = async move || match select(pin!(term.recv()), pin!(int.recv())).await {
        Either::Left(_) => "SIGTERM",
        Either::Right(_) => "SIGINT",
    };
    let signal = next_signal().await;
    // SeqCst, pairing with `State::admit` (it counts, then reads the flag).
    state.draining.store(true, Ordering::SeqCst);
    let in_flight = state.in_flight.load(Ordering::SeqCst);
    tracing::warn!(
        signal,
        in_flight,
        grace_s = grace.as_secs_f64(),
        "draining: /health answers 503 and new generations are refused; stopping once the in-flight requests finish"
    );
    let deadline = Instant::now() + grace;
    let drained = async {
        while state.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match select(pin!(drained), pin!(next_signal())).await {
        Either::Left(_) => {
            match state.in_flight.load(Ordering::SeqCst) {
                0 => {
                    tracing::info!("drained; stopping");
                    // Graceful: the last replies finish writing.
                    handle.stop(true).await;
                }
                left => {
                    tracing::warn!(
                        left,
                        "the drain timeout passed with requests still running; stopping (they are cut)"
                    );
                    // Now, not after another shutdown timeout: the drain
                    // timeout is what operators size their grace period by.
                    handle.stop(false).await;
                }
            }
        }
        Either::Right((signal, _)) => {
            tracing::warn!(signal, "second signal: stopping now");
            handle.stop(false).await;
        }
    }
}

fn routes(cfg: &mut web::ServiceConfig) {
    for prefix in ["/v1", ""] {
        cfg.service(
            web::resource(format!("{prefix}/chat/completions"))
                .route(web::post().to(generate::chat))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("{prefix}/completions"))
                .route(web::post().to(generate::completions))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("{prefix}/models"))
                .route(web::get().to(models))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("{prefix}/tokenize"))
                .route(web::post().to(tokenize::tokenize))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("{prefix}/detokenize"))
                .route(web::post().to(tokenize::detokenize))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource(format!("{prefix}/health"))
                .route(web::get().to(health))
                .default_service(web::to(method_not_allowed)),
        );
    }
    cfg.service(
        web::resource("/metrics")
            .route(web::get().to(metrics))
            .default_service(web::to(method_not_allowed)),
    );
}

/// 200 only when this replica takes new work: 503 while loading, draining,
/// or after the worker died. Cheap: it reads flags, never the decoder's
/// queue.
async fn health(state: web::Data<State>) -> HttpResponse {
    let replica = &state.replica;
    if let Some(reason) = state.failure() {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "status": "error", "error": reason, "replica": replica }))
    } else if state.draining.load(Ordering::Acquire) {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "status": "draining", "replica": replica }))
    } else if state.engine.get().is_some() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "replica": replica }))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "status": "loading", "replica": replica }))
    }
}

async fn models(state: web::Data<State>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": MODEL_ID,
            "object": "model",
            "created": state.created,
            "owned_by": "tofy",
        }],
    })))
}

/// Behind the API key when there is one: the figures say how busy the
/// server is and what it serves, and Prometheus sends a bearer token.
async fn metrics(state: web::Data<State>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    let (active, queued) = state.load();
    Ok(HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render(active, queued)))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::not_found(req.path()).error_response()
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::method_not_allowed(req.method().as_str(), req.path()).error_response()
}

/// A request's id: the client's `x-request-id` when it is short and plain,
/// else a new one.
#[derive(Clone)]
struct RequestId(String);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const REPLICA: HeaderName = HeaderName::from_static("x-tofy-replica");

/// The id [`observe`] gave this request.
pub(crate) fn request_id(req: &HttpRequest) -> String {
    req.extensions()
        .get::<RequestId>()
        .map_or_else(String::new, |id| id.0.clone())
}

/// Gives every request an id (echoed in `x-request-id`), counts every
/// response by route and status, and logs it: 2xx at debug, 4xx at info,
/// 503 at warn, other 5xx at error, each error with its cause.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let state = req.app_data::<web::Data<State>>().cloned();
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(
            || format!("req-{}", uuid::Uuid::new_v4().simple()),
            str::to_string,
        );
    req.extensions_mut().insert(RequestId(id.clone()));
    // The route pattern, not the path: unknown paths must not make new series.
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let mut response = next.call(req).await?;
    let status = response.status().as_u16();
    if let Some(state) = &state {
        let route = route.strip_prefix("/v1").unwrap_or(&route);
        state.metrics.record_request(route, status);
    }
    let ms = start.elapsed().as_millis() as u64;
    let cause = response.response().error().map(|e| {
        e.as_error::<ApiError>()
            .map_or_else(|| e.to_string(), |api| api.cause().to_string())
    });
    let cause = cause.as_deref().unwrap_or("");
    // /health's 503s (loading) are its answer, not a failure; a busy 503
    // is the client's to retry.
    match status {
        _ if route.ends_with("/health") => {
            tracing::debug!(request_id = %id, %method, %route, status, ms, "response");
        }
        503 => tracing::warn!(request_id = %id, %method, %route, status, ms, cause, "response"),
        500.. => tracing::error!(request_id = %id, %method, %route, status, ms, cause, "response"),
        400.. => tracing::info!(request_id = %id, %method, %route, status, ms, cause, "response"),
        _ => tracing::debug!(request_id = %id, %method, %route, status, ms, "response"),
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    if let Some(state) = &state {
        if let Ok(value) = HeaderValue::from_str(&state.replica) {
            response.headers_mut().insert(REPLICA, value);
        }
        // A draining replica closes each connection after its response,
        // so keep-alive clients reconnect (through the balancer, elsewhere).
        if state.draining.load(Ordering::Acquire) {
            response
                .response_mut()
                .head_mut()
                .set_connection_type(actix_web::http::ConnectionType::Close);
        }
    }
    Ok(response)
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
pub(crate) async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::too_large(MAX_BODY));
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ApiError::too_large(MAX_BODY));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}
