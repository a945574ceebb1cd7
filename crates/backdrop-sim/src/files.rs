//! Serving pictures: output downloads (with expiry, redirect, truncation, throttling and
//! wrong-type faults) and the simulator's own input pictures, all rendered lazily on first request and
//! cached by what determines their bytes, so identical outputs are encoded once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::faults::chance;
use super::imagegen::{self, Format, ImageKey, Source, Texture};
use super::{Sim, lock};

/// Cached encodings kept at most; past it the cache starts over (cheap, and bounded).
const IMAGE_CACHE_ENTRIES: usize = 4096;

/// The encoded bytes of `key`, from the cache or rendered on a blocking thread.
pub(crate) async fn image_bytes(sim: &Sim, key: ImageKey) -> Result<Bytes, String> {
    if let Some(bytes) = lock(&sim.images).get(&key) {
        return Ok(bytes.clone());
    }
    let render_key = key.clone();
    let bytes = tokio::task::spawn_blocking(move || imagegen::render(&render_key))
        .await
        .map_err(|e| format!("render task: {e}"))?
        .map_err(|e| format!("encode: {e}"))?;
    let bytes = Bytes::from(bytes);
    let mut cache = lock(&sim.images);
    if cache.len() >= IMAGE_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(key, bytes.clone());
    Ok(bytes)
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

fn image_response(bytes: Bytes, format: Format) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()))], bytes).into_response()
}

/// The query of an output download: set on the hops of a redirect chain.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct OutputQuery {
    /// Redirects still to come before the image is served.
    redirects_left: Option<u32>,
}

/// `302` to the same output on the simulator's own address, `left` more redirects to come.
fn redirect(sim: &Sim, id: &str, file: &str, left: u32) -> Response {
    let location = format!("{}/files/{id}/{file}?redirects_left={left}", sim.base_url);
    let mut response = StatusCode::FOUND.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `GET /files/{id}/{index}.{ext}`: an output image.
pub(crate) async fn output(
    State(sim): State<Arc<Sim>>,
    Path((id, file)): Path<(String, String)>,
    Query(query): Query<OutputQuery>,
) -> Response {
    let Some((index, ext)) = file.split_once('.') else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let Ok(index) = index.parse::<usize>() else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let now = Instant::now();
    let found = sim.with_gen(&id, |g| {
        let key =
            g.outputs.get(index).filter(|k| k.format.ext() == ext && !g.cancelled && g.failure.is_none())?;
        Some((key.clone(), g.ready))
    });
    let Some((key, ready)) = found.flatten() else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if now < ready {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if lock(&sim.urls_expired_at).is_some_and(|at| ready <= at) {
        return plain(StatusCode::GONE, "this output URL has expired");
    }
    let faults = &sim.config.faults;
    if let Some(ttl) = faults.url_ttl_secs
        && now.duration_since(ready) > Duration::from_secs_f64(ttl)
    {
        let mut response = (
            StatusCode::FORBIDDEN,
            "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )
            .into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
        return response;
    }
    match query.redirects_left {
        Some(left) if left > 0 => return redirect(&sim, &id, &file, left - 1),
        Some(_) => {}
        None if faults.redirect_rate > 0.0 && chance(&mut sim.rng(), faults.redirect_rate) => {
            return redirect(&sim, &id, &file, faults.redirect_hops() - 1);
        }
        None => {}
    }
    let (wrong_type, truncate, slow) =
        if faults.wrong_content_type_rate > 0.0 || faults.truncate_rate > 0.0 || faults.slow_rate > 0.0 {
            let mut rng = sim.rng();
            (
                chance(&mut rng, faults.wrong_content_type_rate),
                chance(&mut rng, faults.truncate_rate),
                chance(&mut rng, faults.slow_rate),
            )
        } else {
            (false, false, false)
        };
    if wrong_type {
        let mut response = (
            StatusCode::OK,
            "<!doctype html><html><body><h1>Service temporarily unavailable</h1></body></html>",
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        return response;
    }
    let format = key.format;
    let bytes = match image_bytes(&sim, key).await {
        Ok(bytes) => bytes,
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "render failed"),
    };
    if truncate {
        sim.truncated.fetch_add(1, Ordering::SeqCst);
        return truncated(bytes, format);
    }
    mark_downloaded(&sim, &id, index);
    if slow {
        return throttled(bytes, format, faults.slow_bytes_per_sec);
    }
    image_response(bytes, format)
}

/// Records a complete download; the generation leaves flight once every output is fetched.
fn mark_downloaded(sim: &Sim, id: &str, index: usize) {
    sim.downloads.fetch_add(1, Ordering::SeqCst);
    sim.with_gen(id, |g| {
        g.downloaded |= 1u8 << index.min(7);
        // Only the images asked for count: extra ones (a fault) a careful client never fetches.
        let asked = usize::try_from(g.requested).unwrap_or(usize::MAX).min(g.outputs.len()).min(8);
        let all = u8::try_from((1u16 << asked) - 1).unwrap_or(u8::MAX);
        if g.downloaded & all == all {
            sim.close(g);
        }
    });
}

/// Content-Length promises every byte; half are sent, then the connection is cut.
fn truncated(bytes: Bytes, format: Format) -> Response {
    let full = bytes.len();
    let half = bytes.slice(..full / 2);
    let stream = futures::stream::unfold(Some(half), |half| async move {
        match half {
            Some(half) => Some((Ok(half), None)),
            None => {
                // Let the headers and the first half reach the client before the cut, so it
                // sees a short body rather than no answer at all.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "simulated truncated download",
                    )),
                    None,
                ))
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(full));
    response
}

/// Sends the bytes in ten slices a second at `bytes_per_sec`.
fn throttled(bytes: Bytes, format: Format, bytes_per_sec: u64) -> Response {
    let full = bytes.len();
    let chunk = usize::try_from(bytes_per_sec / 10).unwrap_or(usize::MAX).max(1);
    let stream = futures::stream::unfold(0usize, move |offset| {
        let bytes = bytes.clone();
        async move {
            if offset >= bytes.len() {
                return None;
            }
            if offset > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let end = (offset + chunk).min(bytes.len());
            Some((Ok::<_, std::io::Error>(bytes.slice(offset..end)), end))
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(full));
    response
}

/// What an input URL's query asks of the simulator besides the picture's size: the faults a
/// catalog's links have in the wild.
#[derive(Debug, Default)]
struct InputFaults {
    /// `?status=404`: answer with that status and a text body.
    status: Option<u16>,
    /// `?html=1`: answer 200 with an HTML page (a login wall, a CDN's error page).
    html: bool,
    /// `?pad_kb=N`: the picture followed by N KiB of zeros (decoders ignore bytes after the
    /// image's end), for an input too large to send.
    pad_kb: u32,
    /// `?delay_ms=N`: wait that long before answering (at most 10 s).
    delay_ms: u64,
}

impl InputFaults {
    fn parse(query: &[(String, String)]) -> Self {
        let mut f = Self::default();
        for (k, v) in query {
            match k.as_str() {
                "status" => f.status = v.parse().ok().filter(|s| (100..600).contains(s)),
                "html" => f.html = v == "1" || v == "true",
                "pad_kb" => f.pad_kb = v.parse().unwrap_or(0).min(1 << 20),
                "delay_ms" => f.delay_ms = v.parse().unwrap_or(0).min(10_000),
                _ => {}
            }
        }
        f
    }
}

/// The first byte range of a `Range: bytes=a-b` or `bytes=a-` header, if it is one.
fn byte_range(headers: &axum::http::HeaderMap, len: usize) -> Option<(usize, usize)> {
    let spec = headers.get(header::RANGE)?.to_str().ok()?.strip_prefix("bytes=")?;
    let first = spec.split(',').next()?.trim();
    let (a, b) = first.split_once('-')?;
    let start: usize = a.parse().ok()?;
    let end: usize =
        if b.is_empty() { len.checked_sub(1)? } else { b.parse::<usize>().ok()?.min(len.checked_sub(1)?) };
    (start <= end).then_some((start, end))
}

/// `GET /__sim/input/{name}.png` (or `.jpg`, `?w=&h=`): a deterministic "product on white",
/// with an `ETag` that changes when `POST /__sim/input-version` gives the name a new version
/// (`If-None-Match` answers 304), byte ranges (206), and the faults of [`InputFaults`].
pub(crate) async fn input(
    State(sim): State<Arc<Sim>>,
    Path(file): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let (name, format) = if let Some(name) = file.strip_suffix(".png") {
        (name, Format::Png)
    } else if let Some(name) = file.strip_suffix(".jpg").or_else(|| file.strip_suffix(".jpeg")) {
        (name, Format::Jpeg)
    } else {
        return plain(StatusCode::NOT_FOUND, "inputs are {name}.png or {name}.jpg");
    };
    let faults = InputFaults::parse(&query);
    if faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    if let Some(status) = faults.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
        return (status, "no such picture").into_response();
    }
    if faults.html {
        let mut response =
            (StatusCode::OK, "<!doctype html><html><body><h1>Please sign in</h1></body></html>")
                .into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        return response;
    }
    let (width, height) = super::submit::input_size(
        &sim,
        query
            .iter()
            .map(|(k, v)| (std::borrow::Cow::Borrowed(k.as_str()), std::borrow::Cow::Borrowed(v.as_str()))),
    );
    let version = lock(&sim.input_versions).get(name).copied().unwrap_or(0);
    let etag = format!("\"{name}-{width}x{height}-{}-v{version}-p{}\"", format.ext(), faults.pad_kb);
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"x\""));
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().insert(header::ETAG, etag_value);
        return response;
    }
    let key = ImageKey {
        source: Source::Named { name: name.to_owned(), width, height },
        texture: Texture::Original,
        width,
        height,
        format,
        variant: version,
        alteration: imagegen::Alteration::None,
        jitter: imagegen::Jitter::default(),
    };
    let bytes = match image_bytes(&sim, key).await {
        Ok(bytes) if faults.pad_kb > 0 => {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len() + faults.pad_kb as usize * 1024, 0);
            Bytes::from(padded)
        }
        Ok(bytes) => bytes,
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "render failed"),
    };
    let mut response = match byte_range(&headers, bytes.len()) {
        Some((start, end)) => {
            let total = bytes.len();
            let mut response = image_response(bytes.slice(start..=end), format);
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{total}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            response
        }
        None => image_response(bytes, format),
    };
    response.headers_mut().insert(header::ETAG, etag_value);
    response.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}
