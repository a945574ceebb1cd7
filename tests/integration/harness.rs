//! The test harness: a temp folder with a catalog, a prompt and a state file, the simulator
//! running in-process on 127.0.0.1:0, and the real `backdrop` binary pointed at it with
//! millisecond-scale poll and retry settings.
//!
//! Tests start the simulator from its launch configuration ([`SimConfig`]) and stop it; all
//! else they learn or change goes over HTTP through its `/__sim/*` admin endpoints ([`Sim`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use backdrop::store::Store;
use backdrop_sim::{SimConfig, SimHandle};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A key that must never show up anywhere but the Authorization header.
pub(crate) const SENTINEL_KEY: &str = "sk-sentinel-7f3a9c2e5b1d4f60";

/// One ledger entry, as `GET /__sim/ledger` lists it (the fields the tests read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Charge {
    pub(crate) request_id: String,
    /// Hex sha256 of the request body that was charged.
    pub(crate) body_sha256: String,
    /// Credits or dollars; negative for a refund.
    pub(crate) amount: f64,
    /// `"seedance"` or `"fal"`.
    pub(crate) protocol: String,
    pub(crate) model: String,
    /// The seed the charged request asked for, if any.
    #[serde(default)]
    pub(crate) seed: Option<u64>,
}

/// The simulator's counters, as `GET /__sim/stats` shows them (the fields the tests read).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Stats {
    pub(crate) submits: u64,
    pub(crate) accepted: u64,
    pub(crate) in_flight: u64,
    pub(crate) peak_in_flight: u64,
    pub(crate) peak_submits_per_second: u64,
    pub(crate) dropped_connections: u64,
    pub(crate) webhooks_delivered: u64,
    pub(crate) webhooks_failed: u64,
    /// Files fal's storage kept (both upload flows).
    #[serde(default)]
    pub(crate) uploads: u64,
    #[serde(default)]
    pub(crate) uploaded_bytes: u64,
    #[serde(default)]
    pub(crate) storage_tokens: u64,
    #[serde(default)]
    pub(crate) expired_token_refusals: u64,
    pub(crate) by_status: BTreeMap<u16, u64>,
    pub(crate) by_route: BTreeMap<String, u64>,
}

/// The balances, as `GET /__sim/balance` shows them.
#[derive(Debug, Deserialize)]
struct Balance {
    credits: f64,
    fal_balance: f64,
}

/// The simulator as the tests see it: started in-process, then read and steered only over HTTP.
pub(crate) struct Sim {
    base: String,
    handle: SimHandle,
    http: reqwest::Client,
}

impl Sim {
    /// Starts the simulator on a free port of 127.0.0.1.
    pub(crate) async fn start(config: SimConfig) -> Self {
        let handle = backdrop_sim::start(config).await.expect("simulator starts");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client");
        Self { base: handle.base_url(), handle, http }
    }

    /// Stops the simulator.
    pub(crate) async fn shutdown(self) {
        self.handle.shutdown().await;
    }

    /// The base URL, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub(crate) fn base_url(&self) -> String {
        self.base.clone()
    }

    /// The JWKS document with the key that signs fal webhooks.
    pub(crate) fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base)
    }

    /// A deterministic "product on white" input picture named `name`.
    pub(crate) fn input_url(&self, name: &str) -> String {
        format!("{}/__sim/input/{name}.png", self.base)
    }

    async fn get(&self, path: &str) -> Value {
        let response =
            self.http.get(format!("{}{path}", self.base)).send().await.expect("GET admin endpoint");
        assert!(response.status().is_success(), "GET {path}: {}", response.status());
        response.json().await.expect("admin endpoint answers JSON")
    }

    async fn post(&self, path: &str, body: &Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("POST admin endpoint");
        assert!(response.status().is_success(), "POST {path} {body}: {}", response.status());
        response.json().await.expect("admin endpoint answers JSON")
    }

    /// Every charge so far, in order.
    pub(crate) async fn ledger(&self) -> Vec<Charge> {
        serde_json::from_value(self.get("/__sim/ledger").await).expect("a ledger")
    }

    /// The current counters.
    pub(crate) async fn stats(&self) -> Stats {
        serde_json::from_value(self.get("/__sim/stats").await).expect("stats")
    }

    async fn balance(&self) -> Balance {
        serde_json::from_value(self.get("/__sim/balance").await).expect("balances")
    }

    /// Seedance credits left.
    pub(crate) async fn credits(&self) -> f64 {
        self.balance().await.credits
    }

    /// fal dollars left.
    pub(crate) async fn fal_balance(&self) -> f64 {
        self.balance().await.fal_balance
    }

    /// Sets the seedance credit balance.
    pub(crate) async fn set_credits(&self, credits: f64) {
        self.post("/__sim/balance", &json!({ "credits": credits })).await;
    }

    /// Sets the fal balance, in dollars.
    pub(crate) async fn set_fal_balance(&self, usd: f64) {
        self.post("/__sim/balance", &json!({ "fal_balance": usd })).await;
    }

    /// Revokes (`true`) or restores (`false`) every key: revoked keys get 401 everywhere.
    pub(crate) async fn revoke_keys(&self, revoked: bool) {
        self.post("/__sim/keys", &json!({ "revoked": revoked })).await;
    }

    /// Gives the input picture `name` a new version: other bytes, another ETag, the same URL.
    pub(crate) async fn change_input(&self, name: &str) {
        self.post("/__sim/input-version", &json!({ "name": name })).await;
    }

    /// Requests the simulator answered on its input-picture route so far.
    pub(crate) async fn input_requests(&self) -> u64 {
        self.stats().await.by_route.get("GET /__sim/input/{file}").copied().unwrap_or(0)
    }

    /// Expires every output URL handed out so far: they answer 410 Gone from now on.
    pub(crate) async fn expire_urls(&self) {
        self.post("/__sim/expire-urls", &json!({})).await;
    }

    /// Makes every submit answer `status` for the next `duration`.
    pub(crate) async fn start_burst(&self, status: u16, duration: Duration) {
        self.post("/__sim/burst", &json!({ "status": status, "seconds": duration.as_secs_f64() })).await;
    }
}

pub(crate) struct TestEnv {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) sim: Sim,
}

impl TestEnv {
    pub(crate) async fn new(config: SimConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = Sim::start(config).await;
        Self { dir, sim }
    }

    pub(crate) async fn plain() -> Self {
        Self::new(SimConfig::default()).await
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.path("state.db")
    }

    pub(crate) fn out(&self) -> PathBuf {
        self.path("out")
    }

    /// `backdrop report --format csv` of the state file, which must exit 0: the report's text.
    pub(crate) async fn csv_report(&self) -> String {
        let csv = self.path("report.csv");
        let mut cmd = self.cmd();
        cmd.args(["report", "--format", "csv", "--output"]).arg(&csv).arg("--state").arg(self.state());
        let rep = output(cmd).await;
        assert_eq!(code(&rep), 0, "{}", stderr(&rep));
        std::fs::read_to_string(&csv).expect("the report file")
    }

    /// A catalog of `n` rows whose images the simulator serves.
    pub(crate) fn catalog(&self, n: usize) -> PathBuf {
        let skus: Vec<String> = (0..n).map(|i| format!("SKU-{i:04}")).collect();
        self.catalog_with(&skus)
    }

    pub(crate) fn catalog_with(&self, skus: &[String]) -> PathBuf {
        let mut text = String::from("sku,name,color,image_url\n");
        for (i, sku) in skus.iter().enumerate() {
            let name = format!("img{i}");
            text.push_str(&format!(
                "\"{}\",Mug {i},blue,{}/__sim/input/{name}.png\n",
                sku.replace('"', "\"\""),
                self.sim.base_url()
            ));
        }
        let path = self.path("catalog.csv");
        std::fs::write(&path, text).expect("write catalog");
        path
    }

    /// The test template, written once: a run already started may be reading it, so it is never
    /// truncated under it (a second `run_cmd` beside a live run once made the first read it empty).
    pub(crate) fn prompt(&self) -> PathBuf {
        const TEXT: &str = "+++\nmodel = \"seedream-v4-5\"\ntask = \"edit\"\n+++\nPlace the {color} {name} on a polished marble counter\n";
        let path = self.path("prompt.txt");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(TEXT) {
            let staged = self.path("prompt.txt.new");
            std::fs::write(&staged, TEXT).expect("write prompt");
            std::fs::rename(&staged, &path).expect("move prompt into place");
        }
        path
    }

    /// `backdrop run` on `catalog` with test-speed settings; `extra` flags win.
    pub(crate) fn run_cmd(&self, catalog: &Path, extra: &[&str]) -> tokio::process::Command {
        let prompt = self.prompt();
        let mut cmd = self.cmd();
        cmd.arg("run")
            .arg(catalog)
            .arg("--prompt")
            .arg(prompt)
            .arg("--state")
            .arg(self.state())
            .arg("--out")
            .arg(self.out())
            .args(["--api-base", &self.sim.base_url()])
            .args(["--poll-initial", "20ms", "--poll-max", "100ms"])
            .args(["--retry-base", "20ms", "--retry-max", "2s"])
            .args(["--rate", "1000/s", "--request-timeout", "10s"])
            .args(extra);
        cmd
    }

    /// The binary with the sentinel keys in its environment and nothing else of ours.
    pub(crate) fn cmd(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_backdrop"));
        cmd.current_dir(self.dir.path())
            .env("SEEDANCE_API_KEY", SENTINEL_KEY)
            .env("FAL_KEY", SENTINEL_KEY)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        cmd
    }

    pub(crate) async fn store(&self) -> Store {
        Store::open(&self.state()).await.expect("open store")
    }

    /// Rows by state.
    pub(crate) async fn states(&self) -> std::collections::BTreeMap<String, i64> {
        let store = self.store().await;
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .fetch_all(store.pool())
            .await
            .expect("count states");
        store.close().await;
        rows.into_iter().collect()
    }

    /// Checks every recorded output: the file exists inside the output folder, its sha256 and
    /// size match the store, and it decodes as an image of the recorded size.
    pub(crate) async fn verify_outputs(&self) -> usize {
        let store = self.store().await;
        let rows: Vec<(String, String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT j.sku, o.path, o.sha256, o.bytes, o.width, o.height FROM outputs o JOIN jobs j ON j.id = o.job_id",
        )
        .fetch_all(store.pool())
        .await
        .expect("outputs");
        store.close().await;
        let out = self.out().canonicalize().expect("out exists");
        for (sku, path, sha, bytes, w, h) in &rows {
            let full = out.join(path).canonicalize().expect("output file exists");
            assert!(full.starts_with(&out), "{sku}: {} escapes the output folder", full.display());
            let data = std::fs::read(&full).expect("read output");
            assert_eq!(data.len() as i64, *bytes, "{sku}: size");
            assert_eq!(&format!("{:x}", Sha256::digest(&data)), sha, "{sku}: sha256");
            let img = image::load_from_memory(&data).expect("output decodes");
            assert_eq!((i64::from(img.width()), i64::from(img.height())), (*w, *h), "{sku}: dimensions");
        }
        rows.len()
    }

    /// Files under the output folder that look like partial downloads.
    pub(crate) fn temp_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, found);
                } else if p.to_string_lossy().contains("backdrop-tmp") {
                    found.push(p);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.out(), &mut found);
        found
    }

    /// Ledger entries whose request body was charged more than once.
    pub(crate) async fn double_charges(&self) -> Vec<String> {
        let ledger = self.sim.ledger().await;
        // A refund (fal cancels a request still queued) names the request it gives back, not its
        // body: a refunded request was not paid for.
        let refunded: std::collections::HashSet<&str> =
            ledger.iter().filter(|c| c.amount < 0.0).map(|c| c.request_id.as_str()).collect();
        let mut seen: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        for charge in ledger.iter().filter(|c| c.amount > 0.0 && !refunded.contains(c.request_id.as_str())) {
            seen.entry(charge.body_sha256.clone())
                .or_default()
                .push(format!("{} {}", charge.request_id, charge.amount));
        }
        seen.into_iter()
            .filter(|(_, c)| c.len() > 1)
            .map(|(k, c)| format!("{k} x{} ({})", c.len(), c.join(", ")))
            .collect()
    }
}

pub(crate) async fn output(mut cmd: tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("backdrop finished within 120 s")
        .expect("backdrop runs")
}

pub(crate) fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything a run printed, data (stdout: the plan, the summary) and messages (stderr) alike.
pub(crate) fn all_output(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
