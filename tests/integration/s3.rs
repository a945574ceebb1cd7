//! Outputs in object storage, against a real S3-compatible server: moto's standalone server,
//! started on a free loopback port by [`Moto::start`] and killed when dropped. `scripts/test`
//! installs it into `.venv-moto`; without it these tests say so in one line and pass.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::harness::{TestEnv, code, output, stderr};

/// A moto server on 127.0.0.1, killed on drop.
pub(crate) struct Moto {
    child: std::process::Child,
    pub(crate) endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_server() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("BACKDROP_MOTO_SERVER") {
        return Some(PathBuf::from(path));
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-moto/bin/moto_server");
    local.exists().then_some(local)
}

impl Moto {
    /// Starts moto on a free loopback port, or `None` (with one line saying why) when it is not
    /// installed.
    pub(crate) async fn start() -> Option<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let Some(server) = moto_server() else {
            eprintln!("skipped: moto_server is not installed (scripts/test installs it into .venv-moto)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Self { child, endpoint: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if http.get(format!("{}/", moto.endpoint)).send().await.is_ok() {
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not answer on {} within 30 s", moto.endpoint);
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub(crate) async fn bucket(&self, name: &str) {
        let answer = reqwest::Client::new().put(format!("{}/{name}", self.endpoint)).send().await.unwrap();
        assert!(answer.status().is_success(), "create bucket: {}", answer.status());
    }

    /// The bytes of an object, or `None` when there is none.
    pub(crate) async fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        // moto refuses anonymous reads of a private object but checks no signature.
        let answer = reqwest::Client::new()
            .get(format!("{}/{bucket}/{key}", self.endpoint))
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=backdrop-test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
            )
            .send()
            .await
            .unwrap();
        if answer.status().is_success() { Some(answer.bytes().await.unwrap().to_vec()) } else { None }
    }

    /// The environment a backdrop process needs to reach this server.
    pub(crate) fn env(&self, cmd: &mut tokio::process::Command) {
        cmd.env("AWS_ENDPOINT", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "backdrop-test")
            .env("AWS_SECRET_ACCESS_KEY", "backdrop-test-secret")
            .env("AWS_DEFAULT_REGION", "us-east-1");
    }
}

#[tokio::test]
async fn outputs_become_verified_objects_under_the_prefix() {
    let Some(moto) = Moto::start().await else { return };
    moto.bucket("catalog").await;
    let env = TestEnv::plain().await;
    let catalog = env.catalog(5);
    let mut cmd = env.run_cmd(&catalog, &["--out", "s3://catalog/night1"]);
    moto.env(&mut cmd);
    let out = output(cmd).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&5), "{}", stderr(&out));

    let store = env.store().await;
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT path, sha256, bytes FROM outputs").fetch_all(store.pool()).await.unwrap();
    // The quality gate judged the received bytes before they went to the bucket.
    let (judged,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE quality LIKE '%\"verdict\":{%'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    store.close().await;
    assert_eq!(judged, 5);
    assert_eq!(rows.len(), 5);
    for (path, sha, bytes) in rows {
        let object = moto.object("catalog", &format!("night1/{path}")).await.expect("the object exists");
        assert_eq!(object.len() as i64, bytes, "{path}");
        assert_eq!(format!("{:x}", Sha256::digest(&object)), sha, "{path}");
        image::load_from_memory(&object).expect("the object is the image");
    }
    // Nothing is left in the staging folder, and no local output folder was made.
    let staging = env.path("backdrop-staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().filter(|e| e.path().is_file()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!env.out().exists());

    // The gallery links each object through a presigned URL that works without credentials.
    let gallery = env.path("gallery.html");
    let mut cmd = env.cmd();
    cmd.arg("report").arg("--state").arg(env.state()).args([
        "--out",
        "s3://catalog/night1",
        "--format",
        "html",
    ]);
    cmd.arg("--output").arg(&gallery);
    moto.env(&mut cmd);
    let out = output(cmd).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let html = std::fs::read_to_string(&gallery).unwrap();
    let links: Vec<&str> = html
        .split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|u| u.contains("X-Amz-Signature"))
        .collect();
    assert_eq!(links.len(), 5, "{html}");
    let link = links[0].replace("&amp;", "&");
    assert!(link.starts_with(&moto.endpoint) && link.contains("X-Amz-Expires=604800"), "{link}");
    let answer = reqwest::get(&link).await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    assert!(!html.contains("backdrop-test-secret"));
    env.sim.shutdown().await;
}

#[tokio::test]
async fn a_bucket_that_does_not_exist_keeps_paid_rows_for_the_next_run() {
    let Some(moto) = Moto::start().await else { return };
    let env = TestEnv::plain().await;
    let catalog = env.catalog(2);
    let mut cmd = env.run_cmd(&catalog, &["--out", "s3://missing/x", "--concurrency", "1"]);
    moto.env(&mut cmd);
    let out = output(cmd).await;
    assert_eq!(code(&out), 6, "output failing: {}", stderr(&out));
    assert_eq!(env.states().await.get("done"), None);
    // The bucket appears; the next run stores what was paid for without paying again.
    moto.bucket("missing").await;
    let mut cmd = env.run_cmd(&catalog, &["--out", "s3://missing/x"]);
    moto.env(&mut cmd);
    let out = output(cmd).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&2));
    assert_eq!(env.sim.stats().await.accepted, 2, "each row paid once, over both runs");
    assert!(env.double_charges().await.is_empty());
    env.sim.shutdown().await;
}

#[tokio::test]
async fn bucket_inputs_reach_the_provider_as_presigned_urls() {
    let Some(moto) = Moto::start().await else { return };
    moto.bucket("photos").await;
    let env = TestEnv::plain().await;
    let photo = env.path("a.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([9, 9, 9])).save(&photo).unwrap();
    let put = reqwest::Client::new()
        .put(format!("{}/photos/in/a.png", moto.endpoint))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=backdrop-test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
        )
        .body(std::fs::read(&photo).unwrap())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let catalog = env.path("c.csv");
    std::fs::write(&catalog, "sku,name,color,image_url\nS1,Mug,blue,s3://photos/in/a.png\n").unwrap();
    for provider in ["seedance", "fal"] {
        let mut cmd = env.run_cmd(&catalog, &["--provider", provider, "--force", "-vv"]);
        moto.env(&mut cmd);
        let out = output(cmd).await;
        assert_eq!(code(&out), 0, "{provider}: {}", stderr(&out));
        assert!(!stderr(&out).contains("backdrop-test-secret"), "the secret key never leaves: {provider}");
    }
    // Both protocols' simulators refuse an image URL that is not http(s) or data: (422/400), so
    // an accepted request carried the presigned URL, not the s3:// one.
    assert_eq!(env.sim.stats().await.accepted, 2);
    env.sim.shutdown().await;
}
