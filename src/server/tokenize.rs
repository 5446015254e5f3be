//! `POST /tokenize` and `POST /detokenize`, in llama-server's shapes, so
//! that clients can build embedding prefixes from the decoder's own tokens:
//! `{"content", "add_special"}` → `{"tokens"}`, `{"tokens"}` → `{"content"}`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, State, read_json};
use crate::decoder::{Decoder, DecoderError};

#[derive(Deserialize)]
pub(crate) struct TokenizeRequest {
    content: String,
    /// BOS where the model wants one (llama-server's default: false).
    #[serde(default)]
    add_special: bool,
}

#[derive(Deserialize)]
pub(crate) struct DetokenizeRequest {
    tokens: Vec<i32>,
}

pub(crate) async fn tokenize(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    let body: TokenizeRequest = read_json(&req, payload).await?;
    let tokens = with_decoder(state, move |d| d.tokenize(&body.content, body.add_special)).await?;
    Ok(HttpResponse::Ok().json(json!({ "tokens": tokens })))
}

pub(crate) async fn detokenize(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    let body: DetokenizeRequest = read_json(&req, payload).await?;
    let content = with_decoder(state, move |d| d.detokenize(&body.tokens)).await?;
    Ok(HttpResponse::Ok().json(json!({ "content": content })))
}

/// Runs `f` on the decoder on a blocking thread: the tokenizer is CPU work
/// that must not hold up the server's async workers.
async fn with_decoder<T: Send + 'static>(
    state: web::Data<State>,
    f: impl FnOnce(&dyn Decoder) -> Result<T, DecoderError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(move || f(state.decoder()?).map_err(ApiError::from))
        .await
        .map_err(|e| ApiError::internal("the tokenizer", e.to_string()))?
}
