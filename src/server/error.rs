//! Errors as OpenAI clients expect them: a status code and
//! `{"error":{"message","type","param","code"}}`.
//!
//! A client error (4xx) says what was wrong and what to send instead. A
//! server error (5xx) says which stage failed and no more: what went wrong
//! inside (file paths, llama.cpp messages) is its `detail`, written to the
//! log under the response's `x-request-id`, never sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use super::api::{ErrorBody, ErrorDetail};
use crate::decoder::DecoderError;
use crate::engine::EngineError;
use crate::projector::ProjectorError;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// For the log only.
    pub detail: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            detail: None,
        }
    }

    /// 400: the request is malformed or asks for something unsupported.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one parameter.
    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::invalid(message)
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong API key: send the key given to --api-key (TOFY_API_KEY) as 'Authorization: Bearer KEY'",
            )
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "no route {path}: use /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health or /metrics"
            ),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
        )
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "request body over {} MiB; send a shorter conversation",
                limit >> 20
            ),
        )
    }

    /// 503 with the reason: this replica cannot serve now (loading,
    /// draining, its worker died). A balancer retries it elsewhere.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    /// 429: every sequence and queue place is taken. Not a 503: the replica
    /// is healthy, and a balancer that counts 503s as failures (nginx with
    /// `proxy_next_upstream http_503`) would take it out of rotation and
    /// scatter its conversations' caches. Clients retry a 429 after
    /// `Retry-After` (OpenAI's SDKs do by default), as TGI's overload 429.
    pub fn busy(message: impl Into<String>) -> Self {
        Self {
            code: Some("server_busy"),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "server_error", message)
        }
    }

    /// 500 for this request only: `stage` (what failed, said to the
    /// client) and `detail` (why, for the log).
    pub fn internal(stage: &str, detail: impl Into<String>) -> Self {
        Self {
            detail: Some(detail.into()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!(
                    "{stage} failed on this request; the server log has the details (look up this response's x-request-id)"
                ),
            )
        }
    }

    /// What the log says about this error: the detail where there is one.
    pub fn cause(&self) -> &str {
        self.detail.as_deref().unwrap_or(&self.message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param,
                code: self.code,
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        // A busy or unavailable server says when to try again.
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
        }
        response.json(self.body())
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Decoder(err) => err.into(),
            EngineError::World(err) => Self::internal("the world model", err.to_string()),
            EngineError::WorldThread(err) => Self::internal("the world model", err),
            // What a request asked for that this server cannot give it
            // (prefix mode without a projector or embedding input).
            EngineError::NoProjector { .. }
            | EngineError::NoEmbeddingInput { .. }
            | EngineError::NoControl
            | EngineError::NoControlInput { .. } => {
                Self::invalid_param("tofy.cond_mode", err.to_string())
            }
            // The server's own control map, checked when it started.
            EngineError::ControlMap { .. } => Self::internal("the control map", err.to_string()),
            // A vector of the wrong length, or one whose rows leave the
            // range embedding rows may take: the caller's vector.
            EngineError::Projector(
                ProjectorError::VectorLength { .. } | ProjectorError::Rows(_),
            ) => Self::invalid_param("tofy.conditioning", err.to_string()),
            EngineError::Projector(other) => Self::internal("the projector", other.to_string()),
            EngineError::Embeddings(err) => {
                Self::invalid_param("tofy.prefix_embeddings", err.to_string())
            }
            EngineError::AblateRows => {
                Self::invalid_param("tofy.ablate_conditioning", err.to_string())
            }
        }
    }
}

impl From<DecoderError> for ApiError {
    fn from(err: DecoderError) -> Self {
        match err {
            DecoderError::ContextExceeded { .. } => Self {
                code: Some("context_length_exceeded"),
                param: Some("messages"),
                ..Self::invalid(err.to_string())
            },
            DecoderError::EmptyPrompt => Self::invalid_param("messages", err.to_string()),
            DecoderError::Markers { .. } => Self::invalid_param("messages", err.to_string()),
            DecoderError::Embeddings(_) | DecoderError::Unsupported { .. } => {
                Self::invalid(err.to_string())
            }
            DecoderError::InvalidToken { .. } => Self::invalid_param("tokens", err.to_string()),
            DecoderError::ShuttingDown => Self::unavailable(
                "the server is shutting down and stopped this generation; retry, and a load balancer will send the request to another replica",
            ),
            DecoderError::WorkerDied(_) | DecoderError::WorkerGone => Self {
                detail: Some(err.to_string()),
                ..Self::unavailable(
                    "the decoder's worker thread has stopped and the server is shutting down; retry once it has restarted",
                )
            },
            other => Self::internal("the decoder", other.to_string()),
        }
    }
}
