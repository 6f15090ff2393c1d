//! The JSON body extractor of command routes: size limit, media type, and
//! field-precise decode errors, all as problem+json.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::problem::Problem;

/// Largest command body accepted; CRM commands are small, so anything bigger is hostile or a mistake.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let has_body_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(is_json_media_type);
        if has_body_type == Some(false) {
            return Err(Problem::unsupported_media_type());
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Problem::payload_too_large(MAX_BODY_BYTES)
            } else {
                Problem::bad_request("", rejection.body_text())
            }
        })?;
        decode(&bytes)
    }
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
        Problem::validation(vec![crm_domain::error::FieldError {
            field: unknown_field_path(&field, &message),
            message,
        }])
    })?;
    Ok(JsonBody { value: decoded, body_hash })
}

/// serde reports an unknown field at its parent's path; name the field itself.
fn unknown_field_path(path: &str, message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return path.to_string();
    };
    let name = rest.split('`').next().unwrap_or_default();
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
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
        let problem = decode::<Sample>(br#"{"name":"x","nested":{"count":"many"}}"#).err().unwrap();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.errors[0].field, "nested.count");
    }

    #[test]
    fn unknown_field_is_named() {
        let problem = decode::<Sample>(br#"{"name":"x","colour":"red"}"#).err().unwrap();
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
        let a = decode::<Sample>(br#"{"name":"x","nested":{"count":1}}"#).ok().unwrap();
        let b = decode::<Sample>(br#"{ "nested":{"count":1}, "name":"x" }"#).ok().unwrap();
        assert_eq!(a.body_hash, b.body_hash);
    }
}
