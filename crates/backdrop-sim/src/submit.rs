//! What both protocols share when a paid request arrives: the auth check, the fault gate
//! (script, bursts, rate limit, random 5xx), the input image resolution, the charge, and the
//! bookkeeping of the accepted generation. Each protocol renders the verdicts its own way.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use rand::Rng;
use rand::rngs::StdRng;

use super::faults::{RetryAfterFormat, chance};
use super::imagegen::{Alteration, Format, ImageKey, Jitter, Source, Texture, fit};
use super::money::{Charge, Insufficient, Protocol, unix_ms};
use super::{Gen, Sim, hex_sha256, lock};

/// Side of the simulator's own input pictures when the URL does not say.
pub(crate) const DEFAULT_INPUT_SIDE: u32 = 256;

/// Prompts containing this always fail, so tests can make one row fail on purpose.
pub(crate) const FAIL_MARKER: &str = "[sim:fail]";

/// Which auth scheme a protocol uses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scheme {
    Bearer,
    Key,
}

/// Checks `Authorization`. Any non-empty key passes unless keys are revoked. The key itself is
/// never logged or stored.
pub(crate) fn authorized(sim: &Sim, headers: &HeaderMap, scheme: Scheme) -> bool {
    let prefix = match scheme {
        Scheme::Bearer => "Bearer ",
        Scheme::Key => "Key ",
    };
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(prefix))
        .is_some_and(|key| !key.trim().is_empty());
    ok && !sim.revoked.load(Ordering::SeqCst)
}

/// Why a submit is refused before any work or charge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
}

/// What the fault gate decided for one submit.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Verdict {
    Pass,
    Refuse(Refusal),
    /// Charge, then drop the connection.
    Drop,
}

/// Runs the fault gate for the `seq`th submit.
pub(crate) fn gate(sim: &Sim, seq: u64, rng: &mut StdRng) -> Verdict {
    let faults = &sim.config.faults;
    if let Some(step) = faults.script_step(seq) {
        if step.drop {
            return Verdict::Drop;
        }
        if step.status != 0 {
            return Verdict::Refuse(Refusal {
                status: step.status,
                retry_after: step.retry_after_secs.map(Duration::from_secs),
            });
        }
    }
    let now = Instant::now();
    if let Some(status) = sim.burst_status(now) {
        return Verdict::Refuse(Refusal { status, retry_after: None });
    }
    if let Err(wait) = sim.take_rate_slot(now) {
        return Verdict::Refuse(Refusal {
            status: 429,
            retry_after: Some(wait.max(Duration::from_millis(1))),
        });
    }
    if chance(rng, faults.error_rate) {
        return Verdict::Refuse(Refusal { status: 0, retry_after: None });
    }
    if chance(rng, faults.drop_rate) { Verdict::Drop } else { Verdict::Pass }
}

/// The `Retry-After` header value for a wait, in the configured format (whole seconds, at least 1).
pub(crate) fn retry_after_value(format: RetryAfterFormat, wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    let text = match format {
        RetryAfterFormat::Seconds => secs.to_string(),
        RetryAfterFormat::HttpDate => httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs)),
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("1"))
}

/// Reads an input image reference. `Err` is the message for the client (a 400/422).
pub(crate) fn resolve_source(sim: &Sim, url: &str) -> Result<(Source, (u32, u32)), String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, payload) = rest.split_once(',').ok_or("data: URI without a comma")?;
        if !meta.ends_with(";base64") {
            return Err("data: URI must be base64".into());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| format!("data: URI is not valid base64: {e}"))?;
        let is_image = bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.starts_with(&[0xff, 0xd8, 0xff]);
        if !is_image {
            return Err("data: URI is not a PNG or JPEG image".into());
        }
        let dims = super::imagegen::dimensions(&bytes).ok_or("data: URI image header is unreadable")?;
        let source = Source::Data { sha256: hex_sha256(&bytes), bytes: bytes.into() };
        return Ok((source, dims));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("image URL {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("image URL {url:?} must be http(s) or data:"));
    }
    let own = url::Url::parse(&sim.base_url).ok();
    let same_server = own.as_ref().is_some_and(|own| {
        let local = |h: Option<&str>| matches!(h, Some("127.0.0.1" | "localhost" | "[::1]"));
        (parsed.host_str() == own.host_str() || (local(parsed.host_str()) && local(own.host_str())))
            && parsed.port_or_known_default() == own.port_or_known_default()
    });
    if same_server && let Some(file) = parsed.path().strip_prefix("/__sim/input/") {
        let name = file.strip_suffix(".png").or_else(|| file.strip_suffix(".jpg")).unwrap_or(file);
        let (width, height) = input_size(sim, parsed.query_pairs());
        return Ok((Source::Named { name: name.to_owned(), width, height }, (width, height)));
    }
    Ok((Source::Url(url.to_owned()), (DEFAULT_INPUT_SIDE, DEFAULT_INPUT_SIDE)))
}

/// `?w=&h=` of an input picture URL, capped at `max_side`.
pub(crate) fn input_size<'a>(
    sim: &Sim,
    query: impl Iterator<Item = (std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
) -> (u32, u32) {
    let (mut w, mut h) = (DEFAULT_INPUT_SIDE, DEFAULT_INPUT_SIDE);
    for (k, v) in query {
        match (k.as_ref(), v.parse::<u32>()) {
            ("w", Ok(v)) if v > 0 => w = v,
            ("h", Ok(v)) if v > 0 => h = v,
            _ => {}
        }
    }
    fit(w, h, sim.config.max_side)
}

/// What a protocol hands to [`accept`] once the request is valid.
#[derive(Debug)]
pub(crate) struct Order {
    pub(crate) protocol: Protocol,
    pub(crate) model: String,
    pub(crate) prompt: String,
    pub(crate) source: Source,
    /// Output size before the `max_side` cap.
    pub(crate) size: (u32, u32),
    pub(crate) num_images: u32,
    pub(crate) format: Format,
    pub(crate) seed: Option<u64>,
    pub(crate) price_each: f64,
    pub(crate) body_sha256: String,
}

/// An accepted generation, as the handler needs it to answer.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub(crate) id: String,
    pub(crate) cost: f64,
    pub(crate) remaining: f64,
    pub(crate) ready: Instant,
    pub(crate) rec: Gen,
}

/// A fresh request id: seedance `req_…`, fal a UUID; both from the request's seeded generator.
pub(crate) fn new_id(protocol: Protocol, rng: &mut StdRng) -> String {
    let (a, b): (u64, u64) = (rng.random(), rng.random());
    match protocol {
        Protocol::Seedance => format!("req_{a:016x}{:08x}", b >> 32),
        Protocol::Fal => format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        ),
    }
}

/// Charges the order and records the generation. `Err` means the balance is too low: nothing
/// was charged.
pub(crate) fn accept(sim: &Arc<Sim>, order: Order, rng: &mut StdRng) -> Result<Accepted, Insufficient> {
    let id = new_id(order.protocol, rng);
    let cost = order.price_each * f64::from(order.num_images);
    let remaining = lock(&sim.money).charge(order.protocol, cost, || Charge {
        request_id: id.clone(),
        body_sha256: order.body_sha256.clone(),
        amount: cost,
        protocol: order.protocol,
        model: order.model.clone(),
        images: order.num_images,
        at: unix_ms(),
    })?;
    sim.accepted.fetch_add(1, Ordering::SeqCst);
    let latency = sim.config.faults.latency.sample(rng);
    let now = Instant::now();
    let failure = if order.prompt.contains(FAIL_MARKER) || chance(rng, sim.config.faults.failure_rate) {
        Some("the model could not produce an image for this input (content policy)".to_owned())
    } else {
        None
    };
    let seed = order.seed.unwrap_or_else(|| rng.random_range(0..1u64 << 31));
    let texture = Texture::for_prompt(&order.prompt);
    let (width, height) = fit(order.size.0, order.size.1, sim.config.max_side);
    let alterations = &sim.config.faults.alterations;
    let outputs = (0..order.num_images)
        .map(|variant| {
            let (alteration, jitter) = if matches!(order.source, Source::Prompt) {
                (Alteration::None, Jitter::default())
            } else {
                alterations.draw(texture == Texture::White, rng)
            };
            ImageKey {
                source: order.source.clone(),
                texture,
                width,
                height,
                format: order.format,
                variant,
                alteration,
                jitter,
            }
        })
        .collect();
    let rec = Gen {
        protocol: order.protocol,
        model: order.model,
        // The first quarter of the generation time is spent queued.
        started: now + latency / 4,
        ready: now + latency,
        outputs,
        failure,
        cancelled: false,
        seed,
        cost,
        text_to_image: matches!(order.source, Source::Prompt),
        downloaded: 0,
        open: true,
    };
    sim.insert(id.clone(), rec.clone());
    Ok(Accepted { id, cost, remaining, ready: now + latency, rec })
}

/// The public URL of output `index` of request `id`.
pub(crate) fn output_url(sim: &Sim, id: &str, index: usize, format: Format) -> String {
    format!("{}/files/{id}/{index}.{}", sim.base_url, format.ext())
}

/// `[{url, width, height, content_type}]` for a finished generation.
pub(crate) fn images_json(sim: &Sim, id: &str, rec: &Gen) -> Vec<serde_json::Value> {
    rec.outputs
        .iter()
        .enumerate()
        .map(|(i, key)| {
            serde_json::json!({
                "url": output_url(sim, id, i, key.format),
                "width": key.width,
                "height": key.height,
                "content_type": key.format.content_type(),
            })
        })
        .collect()
}

/// Sleeps until `ready` (synchronous calls wait for their generation).
pub(crate) async fn wait_until(ready: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(ready)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn retry_after_rounds_up_and_formats_dates() {
        assert_eq!(retry_after_value(RetryAfterFormat::Seconds, Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(RetryAfterFormat::Seconds, Duration::from_millis(2100)), "3");
        let date = retry_after_value(RetryAfterFormat::HttpDate, Duration::from_secs(2));
        assert!(httpdate::parse_http_date(date.to_str().unwrap()).is_ok());
    }

    #[test]
    fn ids_are_seeded_and_shaped() {
        let mut a = StdRng::seed_from_u64(3);
        let mut b = StdRng::seed_from_u64(3);
        let id = new_id(Protocol::Fal, &mut a);
        assert_eq!(id, new_id(Protocol::Fal, &mut b));
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert!(new_id(Protocol::Seedance, &mut a).starts_with("req_"));
    }
}
