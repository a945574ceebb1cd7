//! fal's file storage, both upload flows: the CDN v3 flow (a storage token from
//! `POST /storage/auth/token?storage_type=fal-cdn-v3`, then `POST {base_url}/files/upload` with
//! `Authorization: <token_type> <token>`) and the older one (`POST /storage/upload/initiate`, then
//! `PUT` the bytes to its `upload_url`), with their faults (5xx, slow uploads, expired tokens, the
//! v3 flow missing); uploaded files are served back at the URL the upload returned.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::faults::chance;
use super::submit::{Scheme, authorized};
use super::{Sim, lock};

/// Token lifetime when the scenario does not set one (fal's are minutes to hours).
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Largest upload the simulated storage keeps.
const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// One stored file.
#[derive(Debug, Clone)]
pub(crate) struct StoredFile {
    pub(crate) bytes: Bytes,
    pub(crate) content_type: String,
}

/// The storage's state: live tokens, files, and the upload slots the old flow handed out.
#[derive(Debug, Default)]
pub(crate) struct Storage {
    tokens: std::sync::Mutex<HashMap<String, Instant>>,
    files: std::sync::Mutex<HashMap<String, StoredFile>>,
    /// `upload_url` id → the file id and name it fills.
    slots: std::sync::Mutex<HashMap<String, (String, String)>>,
    seq: AtomicU64,
    pub(crate) uploads: AtomicU64,
    pub(crate) uploaded_bytes: AtomicU64,
    pub(crate) tokens_issued: AtomicU64,
    pub(crate) expired_token_refusals: AtomicU64,
}

impl Storage {
    fn next_id(&self, sim: &Sim) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        format!("{}{n:06x}", &sim.queue_token[..4])
    }

    /// The file a URL of this simulator names (`{base}/storage/files/{id}/{name}`), if stored.
    pub(crate) fn file_for_path(&self, path: &str) -> Option<StoredFile> {
        let rest = path.strip_prefix("/storage/files/")?;
        let (id, _name) = rest.split_once('/')?;
        lock(&self.files).get(id).cloned()
    }
}

fn fal_detail(status: StatusCode, detail: &str) -> Response {
    let mut response = (status, Json(json!({ "detail": detail }))).into_response();
    response.headers_mut().insert("x-fal-error-type", HeaderValue::from_static("storage_error"));
    response
}

/// `expires_at` the way fal's Python side writes it: ISO 8601 with a `+00:00` offset.
fn iso(at: SystemTime) -> String {
    let text = humantime::format_rfc3339_micros(at).to_string();
    text.strip_suffix('Z').map_or(text.clone(), |t| format!("{t}+00:00"))
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct TokenQuery {
    storage_type: Option<String>,
}

/// `POST /storage/auth/token?storage_type=fal-cdn-v3` with `Authorization: Key <key>`.
pub(crate) async fn token(
    State(sim): State<Arc<Sim>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&sim, &headers, Scheme::Key) {
        return fal_detail(StatusCode::UNAUTHORIZED, "No valid credentials were provided");
    }
    let faults = &sim.config.faults;
    if faults.storage_v3_unavailable {
        return fal_detail(StatusCode::NOT_FOUND, "Not Found");
    }
    if query.storage_type.as_deref() != Some("fal-cdn-v3") {
        return fal_detail(StatusCode::BAD_REQUEST, "unknown storage_type");
    }
    // The announced lifetime is always the default: the fault makes tokens die earlier than
    // announced (a skewed clock, a token revoked), which only the 401 reveals.
    let ttl = faults.storage_token_ttl_secs.map_or(DEFAULT_TOKEN_TTL, Duration::from_secs_f64);
    let token = format!("tok-{}", sim.storage.next_id(&sim));
    lock(&sim.storage.tokens).insert(token.clone(), Instant::now() + ttl);
    let ttl = DEFAULT_TOKEN_TTL;
    sim.storage.tokens_issued.fetch_add(1, Ordering::SeqCst);
    Json(json!({
        "token": token,
        "token_type": "Bearer",
        "base_url": format!("{}/cdn", sim.base_url),
        "expires_at": iso(SystemTime::now() + ttl),
    }))
    .into_response()
}

/// The faults every upload shares: a 5xx at `upload_error_rate`, `upload_delay_ms` of delay.
async fn upload_faults(sim: &Sim) -> Option<Response> {
    let faults = &sim.config.faults;
    let fail = chance(&mut sim.rng(), faults.upload_error_rate);
    if faults.upload_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.upload_delay_ms)).await;
    }
    fail.then(|| fal_detail(StatusCode::SERVICE_UNAVAILABLE, "storage is temporarily unavailable"))
}

fn keep(sim: &Sim, id: String, name: &str, content_type: &str, body: Bytes) -> String {
    sim.storage.uploads.fetch_add(1, Ordering::SeqCst);
    sim.storage.uploaded_bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    let url = format!("{}/storage/files/{id}/{name}", sim.base_url);
    lock(&sim.storage.files).insert(id, StoredFile { bytes: body, content_type: content_type.to_owned() });
    url
}

/// A file name safe in a URL path: its last segment, ASCII letters, digits, `.`, `-`, `_`.
fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String =
        last.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if cleaned.trim_matches('.').is_empty() { "file".to_owned() } else { cleaned }
}

/// `POST {base_url}/files/upload` with the token, `Content-Type` and `X-Fal-File-Name`.
pub(crate) async fn cdn_upload(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let expiry = lock(&sim.storage.tokens).get(&presented).copied();
    match expiry {
        None => return fal_detail(StatusCode::UNAUTHORIZED, "invalid storage token"),
        Some(at) if at <= Instant::now() => {
            sim.storage.expired_token_refusals.fetch_add(1, Ordering::SeqCst);
            return fal_detail(StatusCode::UNAUTHORIZED, "storage token expired");
        }
        Some(_) => {}
    }
    if let Some(refusal) = upload_faults(&sim).await {
        return refusal;
    }
    if body.is_empty() || body.len() > MAX_UPLOAD_BYTES {
        return fal_detail(StatusCode::BAD_REQUEST, "empty or oversized upload");
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let name = safe_name(headers.get("x-fal-file-name").and_then(|v| v.to_str().ok()).unwrap_or("file"));
    let id = sim.storage.next_id(&sim);
    let url = keep(&sim, id, &name, content_type, body);
    Json(json!({ "access_url": url, "content_type": content_type })).into_response()
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct Initiate {
    file_name: String,
    content_type: String,
}

/// `POST /storage/upload/initiate` `{file_name, content_type}` → `{upload_url, file_url}`.
pub(crate) async fn initiate(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    Json(request): Json<Initiate>,
) -> Response {
    if !authorized(&sim, &headers, Scheme::Key) {
        return fal_detail(StatusCode::UNAUTHORIZED, "No valid credentials were provided");
    }
    let id = sim.storage.next_id(&sim);
    let slot = sim.storage.next_id(&sim);
    let name = safe_name(&request.file_name);
    let file_url = format!("{}/storage/files/{id}/{name}", sim.base_url);
    let upload_url = format!("{}/storage/put/{slot}", sim.base_url);
    lock(&sim.storage.slots).insert(slot, (id, request.content_type));
    Json(json!({ "upload_url": upload_url, "file_url": file_url })).into_response()
}

/// `PUT /storage/put/{slot}`: the bytes for an initiated upload (no key: the URL is the grant).
pub(crate) async fn put(State(sim): State<Arc<Sim>>, Path(slot): Path<String>, body: Bytes) -> Response {
    let Some((id, content_type)) = lock(&sim.storage.slots).get(&slot).cloned() else {
        return (StatusCode::NOT_FOUND, "no such upload").into_response();
    };
    if let Some(refusal) = upload_faults(&sim).await {
        return refusal;
    }
    if body.is_empty() || body.len() > MAX_UPLOAD_BYTES {
        return (StatusCode::BAD_REQUEST, "empty or oversized upload").into_response();
    }
    lock(&sim.storage.slots).remove(&slot);
    let _ = keep(&sim, id, "file", &content_type, body);
    StatusCode::OK.into_response()
}

/// `GET /storage/files/{id}/{name}`: a stored file, as uploaded.
pub(crate) async fn file(State(sim): State<Arc<Sim>>, Path((id, _name)): Path<(String, String)>) -> Response {
    let Some(file) = lock(&sim.storage.files).get(&id).cloned() else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let content_type = HeaderValue::from_str(&file.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    ([(header::CONTENT_TYPE, content_type)], file.bytes).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_safe_segment_and_dates_carry_an_offset() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("a b?.png"), "a_b_.png");
        assert_eq!(safe_name(".."), "file");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(iso(at), "2023-11-14T22:13:20.000000+00:00");
    }

    #[test]
    fn an_uploaded_picture_is_drawn_from_its_own_bytes() {
        let sim = Sim::new(crate::SimConfig::default(), "http://127.0.0.1:9".into()).unwrap();
        let photo = image::RgbImage::from_fn(40, 30, |x, _| image::Rgb([(x * 6) as u8, 90, 200]));
        let png = crate::imagegen::encode(&photo, crate::imagegen::Format::Png).unwrap();
        let url = keep(&sim, "f1".into(), "photo.png", "image/png", Bytes::from(png.clone()));
        let (source, dims) = crate::submit::resolve_source(&sim, &url).unwrap();
        assert_eq!(dims, (40, 30));
        let crate::imagegen::Source::Data { sha256, bytes } = source else {
            panic!("an upload is the uploaded picture, not a made-up product: {source:?}")
        };
        assert_eq!(sha256, crate::hex_sha256(&png));
        assert_eq!(&bytes.0[..], &png[..]);
    }
}
