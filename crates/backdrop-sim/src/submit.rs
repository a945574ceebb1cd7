//! What both protocols share when a paid request arrives: the auth check, the fault gate
//! (script, bursts, rate limit, random 5xx, key echoes, drops, gateway pages), the input image
//! resolution, the charge, and the bookkeeping of the accepted generation. Each protocol renders
//! the verdicts its own way.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
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

/// The key the client presented (for the key-echo fault only; never logged or stored).
pub(crate) fn presented_key(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map_or("", |(_, key)| key.trim())
}

/// Where an error echo is cut by a careless client: the key is placed so that all but its last
/// character fall before this many characters.
pub(crate) const ECHO_CUT: usize = 500;

/// A careless server's error message that echoes `key` three ways: straddling the
/// [`ECHO_CUT`]th character, upper-cased, and percent-encoded (every byte, lower-case hex).
pub(crate) fn key_echo_message(key: &str) -> String {
    const FILLER: &str = "the credentials in the Authorization header were not accepted; ";
    let lead = ECHO_CUT.saturating_sub(key.chars().count().saturating_sub(1));
    let mut message: String = FILLER.chars().cycle().take(lead).collect();
    message.push_str(key);
    let encoded: String = key.bytes().map(|b| format!("%{b:02x}")).collect();
    message.push_str(&format!(" (as received: {}; url-encoded: {encoded})", key.to_uppercase()));
    message
}

/// What a gateway in front of the API answers when the API behind it charged the request but
/// the answer never made it back: 502 with the gateway's own HTML page.
pub(crate) fn gateway_page() -> Response {
    let mut response = (
        StatusCode::BAD_GATEWAY,
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
    )
        .into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}

/// Why a submit is refused before any work or charge.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) cause: Cause,
}

/// What a refusal stands for, which decides its body and whether a 429 carries `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// A scripted answer, a burst or a random 5xx (a 429 among them gets `Retry-After: 1` when
    /// the script names none).
    Fault,
    /// A burst whose 429s carry no `Retry-After`.
    BareFault,
    /// Over the rate limit: `Retry-After` says when there is room, unless configured off.
    RateLimited,
    /// Over the cap on generations in flight: never a `Retry-After` (the server cannot know
    /// when one ends).
    TooManyInFlight,
}

impl Refusal {
    /// The `Retry-After` to send: the refusal's own, else one second for a fault's 429.
    pub(crate) fn retry_after_header(&self) -> Option<Duration> {
        self.retry_after
            .or_else(|| (self.status == 429 && self.cause == Cause::Fault).then_some(Duration::from_secs(1)))
    }
}

/// What the fault gate decided for one submit.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Verdict {
    Pass,
    Refuse(Refusal),
    /// Refuse (uncharged) with a message that echoes the key.
    EchoKey,
    /// Charge, then drop the connection.
    Drop,
    /// Charge, then answer a gateway's 502 HTML page.
    Gateway,
}

/// Runs the fault gate for the `seq`th submit.
///
/// A `Pass` or `Drop` holds a reservation against the cap on generations in flight: the handler
/// goes on to [`accept`], which turns it into the generation or releases it.
pub(crate) fn gate(sim: &Sim, seq: u64, rng: &mut StdRng) -> Verdict {
    let faults = &sim.config.faults;
    if let Some(step) = faults.script_step(seq) {
        if step.drop {
            sim.limits.reserve(sim, None);
            return Verdict::Drop;
        }
        if step.status != 0 {
            return Verdict::Refuse(Refusal {
                status: step.status,
                retry_after: step.retry_after_secs.map(Duration::from_secs),
                cause: Cause::Fault,
            });
        }
    }
    let now = Instant::now();
    if let Some((status, bare)) = sim.burst_status(now) {
        let cause = if bare { Cause::BareFault } else { Cause::Fault };
        return Verdict::Refuse(Refusal { status, retry_after: None, cause });
    }
    let limits = sim.limits.now(sim, now, seq);
    if let Err(wait) = sim.take_rate_slot(now, limits.rate_limit_per_sec) {
        sim.limits.count_rate_limited();
        let retry_after = (!faults.rate_limit_omits_retry_after).then(|| wait.max(Duration::from_millis(1)));
        return Verdict::Refuse(Refusal { status: 429, retry_after, cause: Cause::RateLimited });
    }
    if chance(rng, faults.error_rate) {
        return Verdict::Refuse(Refusal { status: 0, retry_after: None, cause: Cause::Fault });
    }
    if !sim.limits.reserve(sim, limits.max_in_flight) {
        return Verdict::Refuse(Refusal { status: 429, retry_after: None, cause: Cause::TooManyInFlight });
    }
    if chance(rng, faults.key_echo_rate) {
        return Verdict::EchoKey;
    }
    if chance(rng, faults.drop_rate) {
        Verdict::Drop
    } else if chance(rng, faults.gateway_error_rate) {
        Verdict::Gateway
    } else {
        Verdict::Pass
    }
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
    if same_server && parsed.path().starts_with("/storage/files/") {
        // An uploaded file is drawn from its own bytes, as an inline one is: the edit is of
        // the photo that was uploaded. Only its header is read here; the pixels are decoded
        // when the output is rendered, once per distinct output (the render cache).
        let file = sim.storage.file_for_path(parsed.path()).ok_or("image URL names no uploaded file")?;
        let dims = super::imagegen::dimensions(&file.bytes).ok_or("the uploaded file is not an image")?;
        let source = Source::Data { sha256: hex_sha256(&file.bytes), bytes: file.bytes.to_vec().into() };
        return Ok((source, dims));
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

/// A fresh request id: seedance `req_…`, fal a UUID. The first 32 bits are the simulator
/// instance's (random per start, never from the seed), the rest come from the request's seeded
/// generator: two simulators never hand out the same id, so an id saved against one cannot
/// match a job of another, while a replay with the same seed differs only in that prefix.
pub(crate) fn new_id(protocol: Protocol, instance: u32, rng: &mut StdRng) -> String {
    let (a, b): (u64, u64) = (rng.random(), rng.random());
    match protocol {
        Protocol::Seedance => format!("req_{instance:08x}{a:016x}"),
        Protocol::Fal => format!(
            "{instance:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        ),
    }
}

/// Charges the order and records the generation. `Err` means the balance is too low: nothing
/// was charged.
///
/// The submit holds a reservation from [`gate`]; it becomes the generation, or is released when
/// the balance is too low.
pub(crate) fn accept(sim: &Arc<Sim>, order: Order, rng: &mut StdRng) -> Result<Accepted, Insufficient> {
    let id = new_id(order.protocol, sim.instance, rng);
    let cost = order.price_each * f64::from(order.num_images);
    let charged = lock(&sim.money).charge(order.protocol, cost, || Charge {
        request_id: id.clone(),
        body_sha256: order.body_sha256.clone(),
        amount: cost,
        protocol: order.protocol,
        model: order.model.clone(),
        images: order.num_images,
        seed: order.seed,
        at: unix_ms(),
    });
    let remaining = charged.inspect_err(|_| sim.limits.release())?;
    sim.accepted.fetch_add(1, Ordering::SeqCst);
    let latency = sim.config.faults.draw_latency(rng);
    let now = Instant::now();
    let failure = if order.prompt.contains(FAIL_MARKER) || chance(rng, sim.config.faults.failure_rate) {
        Some("the model could not produce an image for this input (content policy)".to_owned())
    } else {
        None
    };
    let seed = order.seed.unwrap_or_else(|| rng.random_range(0..1u64 << 31));
    let texture = Texture::for_prompt(&order.prompt);
    let (width, height) = fit(order.size.0, order.size.1, sim.config.max_side);
    let extra =
        if chance(rng, sim.config.faults.extra_outputs_rate) { sim.config.faults.extra_outputs() } else { 0 };
    let alterations = &sim.config.faults.alterations;
    let outputs = (0..order.num_images + extra)
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
    // With fal's account queue a fal request waits for a slot, then runs its whole latency;
    // otherwise the first quarter of the generation time is spent queued.
    let fal_queue = order.protocol == Protocol::Fal;
    let (started, ready) = if fal_queue && sim.limits.queues_fal() {
        (super::limits::Limits::not_yet(now), super::limits::Limits::not_yet(now))
    } else {
        (now + latency / 4, now + latency)
    };
    let mut rec = Gen {
        protocol: order.protocol,
        model: order.model,
        started,
        ready,
        outputs,
        requested: order.num_images,
        failure,
        cancelled: false,
        seed,
        cost,
        text_to_image: matches!(order.source, Source::Prompt),
        downloaded: 0,
        open: true,
    };
    let inserted = rec.clone();
    if let Some((started, ready)) =
        sim.limits.admit(sim, &id, fal_queue, now, latency, || sim.insert(id.clone(), inserted))
    {
        (rec.started, rec.ready) = (started, ready);
    }
    Ok(Accepted { id, cost, remaining, ready: rec.ready, rec })
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
    fn ids_are_seeded_shaped_and_carry_the_instance() {
        let mut a = StdRng::seed_from_u64(3);
        let mut b = StdRng::seed_from_u64(3);
        let id = new_id(Protocol::Fal, 7, &mut a);
        assert_eq!(id, new_id(Protocol::Fal, 7, &mut b), "same instance, same seed: same id");
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert!(id.starts_with("00000007-"));
        let seedance = new_id(Protocol::Seedance, 7, &mut a);
        assert!(seedance.starts_with("req_00000007") && seedance.len() == 28, "{seedance}");
        let mut c = StdRng::seed_from_u64(3);
        assert_ne!(new_id(Protocol::Fal, 8, &mut c), id, "another instance, another id");
    }

    #[test]
    fn the_key_echo_straddles_the_cut_and_comes_three_ways() {
        let key = "sk-sentinel-0123456789";
        let message = key_echo_message(key);
        let head: String = message.chars().take(ECHO_CUT).collect();
        assert!(head.ends_with(&key[..key.len() - 1]), "{head}");
        assert!(!head.contains(key));
        assert!(message.contains(&key.to_uppercase()));
        assert!(message.contains("%73%6b%2d%73"), "{message}");
    }
}
