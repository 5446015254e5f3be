//! `POST /tokenize` and `POST /detokenize`, in llama-server's shapes, so
//! that clients can build embedding prefixes from the decoder's own tokens:
//! `{"content", "add_special"}` → `{"tokens"}`, `{"tokens"}` → `{"content"}`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, State, read_json};

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
    let tokens = web::block(move || {
        state
            .decoder()?
            .tokenize(&body.content, body.add_special)
            .map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer thread: {e}")))??;
    Ok(HttpResponse::Ok().json(json!({ "tokens": tokens })))
}

pub(crate) async fn detokenize(
    state: web::Data<State>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    state.authorize(&req)?;
    let body: DetokenizeRequest = read_json(&req, payload).await?;
    let content = web::block(move || {
        state
            .decoder()?
            .detokenize(&body.tokens)
            .map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer thread: {e}")))??;
    Ok(HttpResponse::Ok().json(json!({ "content": content })))
}
