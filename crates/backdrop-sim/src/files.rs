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

/// `GET /__sim/input/{name}.png` (or `.jpg`, `?w=&h=`): a deterministic "product on white".
pub(crate) async fn input(
    State(sim): State<Arc<Sim>>,
    Path(file): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (name, format) = if let Some(name) = file.strip_suffix(".png") {
        (name, Format::Png)
    } else if let Some(name) = file.strip_suffix(".jpg").or_else(|| file.strip_suffix(".jpeg")) {
        (name, Format::Jpeg)
    } else {
        return plain(StatusCode::NOT_FOUND, "inputs are {name}.png or {name}.jpg");
    };
    let (width, height) = super::submit::input_size(
        &sim,
        query
            .iter()
            .map(|(k, v)| (std::borrow::Cow::Borrowed(k.as_str()), std::borrow::Cow::Borrowed(v.as_str()))),
    );
    let key = ImageKey {
        source: Source::Named { name: name.to_owned(), width, height },
        texture: Texture::Original,
        width,
        height,
        format,
        variant: 0,
        alteration: imagegen::Alteration::None,
        jitter: imagegen::Jitter::default(),
    };
    match image_bytes(&sim, key).await {
        Ok(bytes) => image_response(bytes, format),
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "render failed"),
    }
}
