//! The JSON body extractor of command routes: size limit, media type, and
//! field-precise decode errors, all as problem+json.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// Largest command body accepted; CRM commands are small, so anything bigger is hostile or a mistake.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How much of an oversized body is read before the connection is given up.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

/// A decoded command body plus a fingerprint of its content.
pub struct JsonBody<T> {
    pub value: T,
    /// SHA-256 of the canonical JSON (sorted keys): the same body always hashes the same.
    pub body_hash: String,
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = Problem;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let has_body_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(is_json_media_type);
        if has_body_type == Some(false) {
            return Err(Problem::unsupported_media_type());
        }
        let declared_length = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        if declared_length.is_some_and(|length| length > DRAIN_LIMIT) {
            return Err(Problem::payload_too_large(MAX_BODY_BYTES));
        }
        let bytes = read_limited(request.into_body()).await?;
        decode(&bytes)
    }
}

/// Reads at most [`MAX_BODY_BYTES`]. An oversized body is still read (and
/// dropped) up to [`DRAIN_LIMIT`], so the client finishes sending and reliably
/// receives the 413 instead of a reset connection.
async fn read_limited(body: Body) -> Result<Vec<u8>, Problem> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            Problem::bad_request("", format!("could not read the body: {error}"))
        })?;
        seen += chunk.len();
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= MAX_BODY_BYTES {
            bytes.extend_from_slice(&chunk);
        }
    }
    if seen > MAX_BODY_BYTES {
        return Err(Problem::payload_too_large(MAX_BODY_BYTES));
    }
    Ok(bytes)
}

fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Decodes a body: syntax errors are 400, shape errors (wrong type, unknown or
/// missing field) are 422 naming the field. An empty body counts as `{}`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<JsonBody<T>, Problem> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|error| Problem::bad_request("", format!("body is not valid JSON: {error}")))?;
    let body_hash = hex::encode(Sha256::digest(value.to_string().as_bytes()));
    let decoded = serde_path_to_error::deserialize(&value).map_err(|error| {
        let field = error.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let message = error.into_inner().to_string();
        Problem::validation(vec![crm_domain::error::FieldError { field, message }])
    })?;
    Ok(JsonBody {
        value: decoded,
        body_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        nested: Option<Nested>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Nested {
        count: u32,
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let problem = decode::<Sample>(br#"{"name":"x","nested":{"count":"many"}}"#)
            .err()
            .unwrap();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.errors[0].field, "nested.count");
    }

    #[test]
    fn unknown_field_is_named() {
        let problem = decode::<Sample>(br#"{"name":"x","colour":"red"}"#)
            .err()
            .unwrap();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.errors[0].field, "colour");
    }

    #[test]
    fn syntax_error_and_deep_nesting_are_400() {
        assert_eq!(decode::<Sample>(b"{\"name\":").err().unwrap().status, 400);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(decode::<Sample>(deep.as_bytes()).err().unwrap().status, 400);
    }

    #[test]
    fn same_content_hashes_the_same_whatever_the_key_order() {
        let a = decode::<Sample>(br#"{"name":"x","nested":{"count":1}}"#)
            .ok()
            .unwrap();
        let b = decode::<Sample>(br#"{ "nested":{"count":1}, "name":"x" }"#)
            .ok()
            .unwrap();
        assert_eq!(a.body_hash, b.body_hash);
    }
}
