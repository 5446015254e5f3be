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

pub mod api;
mod embeds;
mod error;
mod generate;
mod metrics;
mod peer;
mod tokenize;
pub mod tools;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, ResponseError, web};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::decoder::{Decoder, Sampling};
use crate::engine::Engine;

pub use error::ApiError;
use metrics::Metrics;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 16 << 20;
/// The model id clients use and replies carry.
pub const MODEL_ID: &str = "tofy";

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
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("server I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0:#}")]
    Load(anyhow::Error),
}

/// What every handler shares.
pub(crate) struct State {
    engine: OnceLock<Engine>,
    metrics: Metrics,
    /// Requests admitted and not yet finished (running or queued).
    in_flight: AtomicUsize,
    parallel: usize,
    queue: usize,
    api_key: Option<String>,
    sampling: Sampling,
    max_tokens: usize,
    created: u64,
}

impl State {
    fn engine(&self) -> Result<&Engine, ApiError> {
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("the decoder model is still loading; retry shortly (GET /health says when it is ready)"))
    }

    fn decoder(&self) -> Result<&dyn Decoder, ApiError> {
        Ok(self.engine()?.decoder())
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
            .map(str::trim);
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    /// A place among the running or queued requests, or 503.
    fn admit(self: &Arc<Self>) -> Result<Admission, ApiError> {
        let limit = self.parallel + self.queue;
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::unavailable(format!(
                "server busy: {limit} requests are running or queued (--parallel {}, --queue {}); retry later",
                self.parallel, self.queue
            )));
        }
        Ok(Admission(Arc::clone(self)))
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

/// Serves until SIGINT/SIGTERM. `load_engine` runs behind the open port;
/// if it fails the server stops and its error is returned.
pub fn serve<F>(load_engine: F, options: ServeOptions) -> Result<(), ServeError>
where
    F: FnOnce() -> anyhow::Result<Engine> + Send + 'static,
{
    let state = Arc::new(State {
        engine: OnceLock::new(),
        metrics: Metrics::default(),
        in_flight: AtomicUsize::new(0),
        parallel: options.parallel.max(1),
        queue: options.queue,
        api_key: options.api_key.filter(|k| !k.is_empty()),
        sampling: options.sampling,
        max_tokens: options.max_tokens,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let data = web::Data::from(Arc::clone(&state));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    // The loader sets its error before it stops the server, so the error is
    // there when `server.await` returns. (Unwrapping the Arc instead raced
    // the loader thread's own drop of its clone: a failed load could exit 0.)
    let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    actix_web::rt::System::new().block_on(async {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .wrap(from_fn(count_requests))
                .configure(routes)
                .default_service(web::to(not_found))
        })
        .on_connect(peer::on_connect)
        .workers(workers)
        .shutdown_timeout(5)
        .listen(options.listener)?
        .run();
        let handle = server.handle();
        let (loader_state, loader_error) = (Arc::clone(&state), Arc::clone(&load_error));
        std::thread::Builder::new()
            .name("tofy-load".into())
            .spawn(move || match load_engine() {
                Ok(engine) => {
                    let _ = loader_state.engine.set(engine);
                    eprintln!("tofy serve: decoder ready");
                }
                Err(err) => {
                    *loader_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                    // stop() sends its command at once; nobody awaits it.
                    drop(handle.stop(false));
                }
            })?;
        server.await
    })?;
    let failed = load_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match failed {
        Some(err) => Err(ServeError::Load(err)),
        None => Ok(()),
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

async fn health(state: web::Data<State>) -> HttpResponse {
    if state.engine.get().is_some() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
    } else {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "loading" }))
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

async fn metrics(state: web::Data<State>) -> HttpResponse {
    let (active, queued) = state.load();
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render(active, queued))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::not_found(req.path()).error_response()
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    ApiError::method_not_allowed(req.method().as_str(), req.path()).error_response()
}

/// Counts every response by route and status.
async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<State>>().cloned();
    // The route pattern, not the path: unknown paths must not make new series.
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let response = next.call(req).await?;
    if let Some(state) = state {
        let route = route.strip_prefix("/v1").unwrap_or(&route);
        state
            .metrics
            .record_request(route, response.status().as_u16());
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
