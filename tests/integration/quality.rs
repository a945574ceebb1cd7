//! The quality gate measured on the simulator: a seeded set of edits, some altered on purpose
//! (moved, scaled, recoloured, reshaped, unlabeled, missing, off-white, blank, cut short) and
//! the rest faithful but varied as a real model's are (relit, shifted, another resolution, JPEG),
//! downloaded over HTTP from the simulator and judged by `backdrop::quality::assess` against
//! their inputs. The simulator says which outputs it altered (`GET /__sim/alterations`).
//! Targets: at least 95 % of altered outputs held, at most 2 % of faithful ones.

use std::collections::BTreeMap;
use std::time::Duration;

use backdrop::quality::{self, BackgroundRules, QualitySettings};
use backdrop_sim::faults::Alterations;
use backdrop_sim::{Faults, SimConfig};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::Sim;

const KEY: &str = "sk-sentinel-quality-tests";
/// Rows in the measured set.
const ROWS: usize = 240;

/// Backgrounds the rows ask for; the last is a marketplace main image held to white-background
/// rules.
const PROMPTS: [&str; 6] = [
    "Replace the background with polished marble",
    "Place it on a rustic oak table",
    "Put it on natural linen",
    "A soft grey studio sweep",
    "A dreamy sunset gradient",
    "Marketplace main image on a pure white background",
];

/// Sizes of the submitted input; the input the gate compares with is the same picture at 4/3
/// of that size, so every comparison of a drawn product crosses resolutions.
const SIZES: [(u32, u32); 3] = [(128, 128), (128, 112), (112, 128)];

/// Every fifth row sends one of the repository's sample photos inline instead of one of the
/// simulator's drawn products: the simulator edits the photo itself, and the gate compares the
/// output with that photo.
const PHOTO_EVERY: usize = 5;

/// The sample photos the photo rows cycle through: all of them, the white mug, the white
/// sneaker and the clear glass on light backgrounds included.
const PHOTOS: [&str; 12] = [
    "mug-blue",
    "mug-white",
    "sneaker-white",
    "tumbler-glass",
    "bottle-black",
    "lamp-brass",
    "tote-olive",
    "watch-steel",
    "pot-terracotta",
    "stool-oak",
    "candle-cream",
    "headphones-red",
];

/// The name of row `i`'s sample photo, when it is a photo row.
fn photo_name(i: usize) -> Option<&'static str> {
    (i % PHOTO_EVERY == PHOTO_EVERY - 1).then(|| PHOTOS[(i / PHOTO_EVERY) % PHOTOS.len()])
}

/// Row `i`'s sample photo, when it is a photo row.
fn photo(i: usize) -> Option<Vec<u8>> {
    photo_name(i).map(|name| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("samples/{name}.png"));
        std::fs::read(path).expect("a sample photo")
    })
}

struct Row {
    kind: String,
    marketplace: bool,
    photo: Option<&'static str>,
    input: Vec<u8>,
    output: Vec<u8>,
}

async fn get_bytes(c: &reqwest::Client, url: &str) -> Vec<u8> {
    let response = c.get(url).send().await.expect("GET");
    assert_eq!(response.status(), 200, "{url}");
    response.bytes().await.expect("body").to_vec()
}

/// One submitted row: its index, request id, output URL, and whether it is a marketplace image.
struct Submitted {
    i: usize,
    id: String,
    url: String,
    marketplace: bool,
}

/// Submits row `i` as a synchronous edit.
async fn submit(c: &reqwest::Client, base: &str, i: usize) -> Submitted {
    let (w, h) = SIZES[i % SIZES.len()];
    let prompt = PROMPTS[i % PROMPTS.len()];
    let format = if i % 4 == 3 { "jpeg" } else { "png" };
    let image = match photo(i) {
        Some(bytes) => {
            use base64::Engine as _;
            format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        None => format!("{base}/__sim/input/Q-{i:04}.png?w={w}&h={h}"),
    };
    let body = json!({
        "prompt": prompt,
        "image_urls": [image],
        "output_format": format,
    });
    let response = c
        .post(format!("{base}/v1/seedream/v4.5/edit"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("POST edit");
    assert_eq!(response.status(), 200);
    let v: Value = response.json().await.expect("JSON");
    let url = v["images"][0]["url"].as_str().expect("an output URL").to_owned();
    // `{base}/files/{id}/0.{ext}`
    let id = url.rsplit('/').nth(1).expect("a request id").to_owned();
    Submitted { i, id, url, marketplace: prompt.contains("pure white") }
}

/// Downloads a row's output, and its input at 4/3 of the submitted size.
async fn download(
    c: &reqwest::Client,
    base: &str,
    s: Submitted,
) -> (String, bool, Option<&'static str>, Vec<u8>, Vec<u8>) {
    let (w, h) = SIZES[s.i % SIZES.len()];
    let output = get_bytes(c, &s.url).await;
    let input = match photo(s.i) {
        Some(bytes) => bytes,
        None => {
            get_bytes(c, &format!("{base}/__sim/input/Q-{:04}.png?w={}&h={}", s.i, w * 4 / 3, h * 4 / 3))
                .await
        }
    };
    (s.id, s.marketplace, photo_name(s.i), input, output)
}

fn settings(marketplace: bool) -> QualitySettings {
    let mut settings = QualitySettings::default();
    if marketplace {
        settings.background =
            BackgroundRules { white_border: Some(6), min_fill: Some(0.5), min_longest_side: None };
    }
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_holds_altered_edits_and_passes_faithful_ones() {
    let alterations = Alterations {
        moved_rate: 0.06,
        scaled_rate: 0.06,
        recolored_rate: 0.06,
        reshaped_rate: 0.06,
        unlabeled_rate: 0.06,
        missing_rate: 0.05,
        off_white_rate: 0.3,
        blank_rate: 0.05,
        cut_short_rate: 0.07,
        jitter: true,
    };
    let config =
        SimConfig { seed: 17, faults: Faults { alterations, ..Faults::default() }, ..SimConfig::default() };
    let sim = Sim::start(config).await;
    let base = sim.base_url();
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");

    let started = std::time::Instant::now();
    // Submitted one by one (the simulator draws each request's alterations in arrival order, so
    // the set is the same every run), downloaded eight at a time.
    let mut submitted = Vec::with_capacity(ROWS);
    for i in 0..ROWS {
        submitted.push(submit(&c, &base, i).await);
    }
    let edits: Vec<_> =
        futures::stream::iter(submitted).map(|s| download(&c, &base, s)).buffered(8).collect().await;
    let fetched = started.elapsed();
    let altered: Vec<Value> =
        c.get(format!("{base}/__sim/alterations")).send().await.expect("GET").json().await.expect("JSON");
    let kinds: BTreeMap<String, String> = altered
        .iter()
        .map(|a| {
            (
                a["request_id"].as_str().unwrap_or_default().to_owned(),
                a["kind"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let rows: Vec<Row> = edits
        .into_iter()
        .map(|(id, marketplace, photo, input, output)| Row {
            kind: kinds.get(&id).cloned().unwrap_or_else(|| "faithful".into()),
            marketplace,
            photo,
            input,
            output,
        })
        .collect();
    sim.shutdown().await;

    // The gate is CPU-bound: judge on blocking threads, as the pipeline will.
    let started = std::time::Instant::now();
    let judged: Vec<(String, Option<&str>, bool, String)> = futures::stream::iter(rows)
        .map(|row| {
            tokio::task::spawn_blocking(move || {
                let input = quality::decode(&row.input, "input").expect("input decodes");
                let output = quality::decode(&row.output, "output").expect("output decodes");
                let verdict = quality::assess(&input, &output, &settings(row.marketplace)).expect("assess");
                // For tuning thresholds: QUALITY_SCORES=FILE appends each row's kind and scores.
                if let Ok(path) = std::env::var("QUALITY_SCORES") {
                    use std::io::Write as _;
                    let scores: Vec<String> = verdict
                        .checks
                        .iter()
                        .map(|c| format!("{}={:.3}", c.check.name(), c.score.unwrap_or(f64::NAN)))
                        .collect();
                    let mut f =
                        std::fs::OpenOptions::new().append(true).create(true).open(path).expect("open");
                    writeln!(f, "{} {}", row.kind, scores.join(" ")).expect("write");
                }
                (row.kind, row.photo, verdict.passed(), verdict.summary())
            })
        })
        .buffered(2)
        .map(|joined| joined.expect("the check does not panic"))
        .collect()
        .await;
    let judging = started.elapsed();

    let mut tally: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    // The same, for the photo rows alone.
    let mut photos: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (kind, photo, passed, summary) in &judged {
        for t in [Some(&mut tally), photo.and(Some(&mut photos))].into_iter().flatten() {
            let entry = t.entry(kind.as_str()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(!passed);
        }
        // Show every mistake: a faithful row held, an altered one passed.
        if (kind == "faithful") != *passed {
            let what = photo.unwrap_or("drawn");
            eprintln!("  {kind:<10} {what} {}: {summary}", if *passed { "passed" } else { "held" });
        }
    }
    eprintln!("quality gate on {ROWS} simulated edits (fetch {fetched:.1?}, judge {judging:.1?}):");
    eprintln!("  {:<10} {:>5} {:>5} {:>7}   {:>6} {:>5}", "kind", "rows", "held", "held %", "photos", "held");
    for (kind, (n, held)) in &tally {
        let (pn, ph) = photos.get(kind).copied().unwrap_or_default();
        eprintln!(
            "  {kind:<10} {n:>5} {held:>5} {:>6.1}%   {pn:>6} {ph:>5}",
            100.0 * *held as f64 / *n as f64
        );
    }
    let (faithful, faithful_held) = tally.get("faithful").copied().unwrap_or_default();
    let (altered, altered_held) = tally
        .iter()
        .filter(|(k, _)| **k != "faithful")
        .fold((0, 0), |(n, h), (_, (rn, rh))| (n + rn, h + rh));
    eprintln!(
        "  altered: {altered_held}/{altered} held ({:.1}%), faithful: {faithful_held}/{faithful} held ({:.1}%)",
        100.0 * altered_held as f64 / altered as f64,
        100.0 * faithful_held as f64 / faithful as f64
    );

    for kind in [
        "moved",
        "scaled",
        "recolored",
        "reshaped",
        "unlabeled",
        "missing",
        "off_white",
        "blank",
        "cut_short",
    ] {
        let n = tally.get(kind).map_or(0, |t| t.0);
        assert!(n >= 8, "the set covers every kind of alteration: {kind} has {n} rows");
    }
    assert!(faithful >= 100, "{faithful} faithful rows");
    assert!(
        altered_held * 100 >= altered * 95,
        "at least 95% of altered rows held: {altered_held}/{altered}"
    );
    assert!(
        faithful_held * 100 <= faithful * 2,
        "at most 2% of faithful rows held: {faithful_held}/{faithful}"
    );
}
