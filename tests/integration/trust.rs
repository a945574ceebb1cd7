//! Money and trust under real local failures (issue 15): an output folder that cannot be written,
//! results whose URLs expire while backdrop is away, a state database reached by another name,
//! deleted, or belonging to another program, and two runs sharing one output folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backdrop_sim::{Faults, Latency, SimConfig};
use sqlx::Connection as _;

use crate::harness::{TestEnv, code, output, stderr};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn job(env: &TestEnv, sku: &str) -> (String, Option<String>, Option<String>) {
    let store = env.store().await;
    let row = sqlx::query_as("SELECT state, request_id, result FROM jobs WHERE sku = ?")
        .bind(sku)
        .fetch_one(store.pool())
        .await
        .expect("the row");
    store.close().await;
    row
}

/// Waits until `done` holds, polling every 20 ms for at most 30 s.
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The crate forbids unsafe code, so tests send signals other than SIGKILL with `kill(1)`.
fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_folder_that_fails_mid_run_stops_submits_and_keeps_the_paid_row() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(10);
    // SKU-0003's folder cannot be made: a regular file has its name. Creating its output fails
    // with ENOTDIR, for root too.
    std::fs::create_dir_all(env.out()).unwrap();
    std::fs::write(env.out().join("SKU-0003"), b"in the way").unwrap();
    let out = output(env.run_cmd(&catalog, &["--concurrency", "1"])).await;
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(stderr(&out).contains("SKU-0003"), "the failing path is named: {}", stderr(&out));
    // Rows 0-3 were paid; nothing after the failure was sent.
    assert_eq!(env.sim.ledger().await.len(), 4, "{}", stderr(&out));
    let (state, request, result) = job(&env, "SKU-0003").await;
    assert_eq!(state, "fetching", "the paid row is kept for the next run");
    assert!(request.is_some());
    assert!(result.is_some_and(|r| r.contains("/files/")), "its result with the output URLs is kept");
    let states = env.states().await;
    assert_eq!((states.get("done"), states.get("pending")), (Some(&3), Some(&6)), "{states:?}");

    // `status` says it is paid and not downloaded, and until when its URLs work.
    let status = output({
        let mut cmd = env.cmd();
        cmd.args(["status", "--state"]).arg(env.state());
        cmd
    })
    .await;
    let text = stdout(&status);
    assert!(text.contains("paid, not downloaded (1)"), "{text}");
    assert!(text.contains("SKU-0003  (fetching) download by "), "{text}");

    // Fixed: the next run downloads it from the saved result and pays only for the rest.
    std::fs::remove_file(env.out().join("SKU-0003")).unwrap();
    let again = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(env.states().await.get("done"), Some(&10));
    assert_eq!(env.verify_outputs().await, 10);
    assert_eq!(env.sim.ledger().await.len(), 10, "SKU-0003 was not paid for twice");
    assert!(env.double_charges().await.is_empty());
}

/// A folder that nothing may be written in: read-only for an ordinary user; for root (for whom
/// permissions do not apply) a path through a regular file.
fn unwritable_folder(env: &TestEnv) -> PathBuf {
    let dir = env.path("locked");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    if std::fs::write(dir.join("probe"), b"x").is_err() {
        return dir.join("out");
    }
    // Root ignores the mode: use a path whose parent is a file (ENOTDIR for everyone).
    eprintln!("running as root: a read-only folder does not stop root; using a path through a file");
    std::fs::write(env.path("a-file"), b"x").unwrap();
    env.path("a-file").join("out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_output_folder_is_refused_before_anything_is_paid() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(5);
    let folder = unwritable_folder(&env);
    let out = output(env.run_cmd(&catalog, &["--out", folder.to_str().unwrap()])).await;
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("the output folder cannot be written, so nothing was sent"), "{err}");
    assert!(err.contains(folder.to_str().unwrap()), "the path is named: {err}");
    assert!(err.contains("os error"), "the OS error is given: {err}");
    assert_eq!(env.sim.stats().await.submits, 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_downloads_a_paid_result_again_and_never_pays_twice() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(4);
    // Every download is refused (larger than the limit): paid, not downloaded.
    let out = output(env.run_cmd(&catalog, &["--max-download-bytes", "64"])).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(env.states().await.get("failed"), Some(&4));
    assert_eq!(env.sim.ledger().await.len(), 4);

    let retry = |extra: &[&str]| {
        let mut cmd = env.cmd();
        cmd.args(["retry", "--state"]).arg(env.state()).args(extra);
        cmd
    };
    let o = output(retry(&["--failed"])).await;
    let text = stdout(&o);
    assert_eq!(code(&o), 0, "{text}{}", stderr(&o));
    assert!(
        text.contains("SKU-0000: paid, not downloaded: re-queued to download its saved result again"),
        "{text}"
    );
    assert!(text.contains("re-queued 4 rows (4 for download only)"), "{text}");
    assert_eq!(job(&env, "SKU-0000").await.0, "fetching");

    let again = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(env.states().await.get("done"), Some(&4));
    assert_eq!(env.verify_outputs().await, 4);
    assert_eq!(env.sim.ledger().await.len(), 4, "the downloads were redone, the requests were not");

    // A row the provider charged is resubmitted only when the user says so, in the flag's name.
    let o = output(retry(&["--sku", "SKU-0001"])).await;
    let text = stdout(&o);
    assert!(text.contains("SKU-0001: left as done: the provider already charged for it"), "{text}");
    assert!(text.contains("`--pay-again`"), "{text}");
    assert_eq!(job(&env, "SKU-0001").await.0, "done");
    let o = output(retry(&["--sku", "SKU-0001", "--pay-again"])).await;
    let text = stdout(&o);
    assert!(
        text.contains("warning: --pay-again: 1 row(s) the provider already charged are re-queued"),
        "{text}"
    );
    assert_eq!(job(&env, "SKU-0001").await.0, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_downloads_ready_results_so_urls_expiring_later_lose_nothing() {
    // Results are ready at once, but the first poll waits seconds: at the SIGTERM every row in
    // flight has a result that is ready and not collected.
    let env = TestEnv::plain().await;
    let catalog = env.catalog(12);
    let child = env
        .run_cmd(&catalog, &["--concurrency", "4", "--poll-initial", "6s", "--poll-max", "6s"])
        .spawn()
        .unwrap();
    wait_until("four accepted submits", || async { env.sim.stats().await.accepted >= 4 }).await;
    send_signal(child.id().unwrap(), "TERM");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let states = env.states().await;
    assert_eq!(states.get("submitted"), None, "no ready result was left at the provider: {states:?}");
    assert_eq!(states.get("done"), Some(&4), "{states:?}");

    // Backdrop is away past the URLs' lifetime: whatever was not downloaded is lost for good.
    env.sim.expire_urls().await;
    let again = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert_eq!(env.states().await.get("done"), Some(&12));
    assert_eq!(env.sim.ledger().await.len(), 12);
    assert!(env.double_charges().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_collected_after_its_urls_expired_is_reported_not_resubmitted() {
    // The other side of the grace: a row still generating at the SIGTERM is left `submitted`; if
    // its URLs expire before the next run, it fails as paid-not-downloaded, and nothing is paid
    // again behind the user's back.
    let faults = Faults { latency: Latency::Fixed { ms: 2_000 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let catalog = env.catalog(2);
    let child = env.run_cmd(&catalog, &["--concurrency", "2"]).spawn().unwrap();
    wait_until("two accepted submits", || async { env.sim.stats().await.accepted >= 2 }).await;
    send_signal(child.id().unwrap(), "TERM");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(env.states().await.get("submitted"), Some(&2));
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    env.sim.expire_urls().await;
    let again = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&again), 3, "{}", stderr(&again));
    assert_eq!(env.states().await.get("failed"), Some(&2));
    assert_eq!(env.sim.ledger().await.len(), 2, "nothing is resubmitted");
    let (_, _, result) = job(&env, "SKU-0000").await;
    assert!(result.is_some(), "the result is kept: a provider that renews URLs can still be asked");
}

async fn slow_run(env: &TestEnv, rows: usize) -> tokio::process::Child {
    let catalog = env.catalog(rows);
    let mut cmd = env.run_cmd(&catalog, &["--concurrency", "2"]);
    cmd.stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_through_a_symlink_or_after_the_old_lock_file_is_deleted_is_refused() {
    let faults = Faults { latency: Latency::Fixed { ms: 400 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let first = slow_run(&env, 12).await;
    let holder = first.id().unwrap();
    wait_until("the first run's first submit", || async { env.sim.stats().await.accepted >= 1 }).await;
    let catalog = env.path("catalog.csv");
    let link = env.path("link.db");
    std::os::unix::fs::symlink(env.state(), &link).unwrap();
    // What used to free the lock: deleting the side file beside the database.
    let _ = std::fs::remove_file(env.path("state.db.lock"));
    for state in [link.clone(), env.state()] {
        let out = output(env.run_cmd(&catalog, &["--state", state.to_str().unwrap()])).await;
        assert_eq!(code(&out), 2, "{}: {}", state.display(), stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("another backdrop run is using"), "{err}");
        assert!(err.contains(&format!("pid {holder}")), "the holder's pid is named: {err}");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), first.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(env.sim.ledger().await.len(), 12, "only the first run paid");
    assert!(env.double_charges().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_deleted_mid_run_stops_the_spending() {
    let faults = Faults { latency: Latency::Fixed { ms: 300 }, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let child = slow_run(&env, 30).await;
    wait_until("a few accepted submits", || async { env.sim.stats().await.accepted >= 3 }).await;
    std::fs::remove_file(env.state()).unwrap();
    let at_delete = env.sim.stats().await.submits;
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("was deleted while this run was using it"), "{err}");
    // At most the intents already committed (one per place in flight) left after the delete.
    let submits = env.sim.stats().await.submits;
    assert!(submits <= at_delete + 2, "{submits} submits, {at_delete} at the delete: {err}");
    assert!(submits < 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_sqlite_file_is_refused_and_left_as_it_was() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(3);
    let foreign = env.path("notes.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&foreign).create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::query("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)").execute(&mut conn).await.unwrap();
    sqlx::query("INSERT INTO notes (body) VALUES ('keep me')").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let before = std::fs::read(&foreign).unwrap();
    let out = output(env.run_cmd(&catalog, &["--state", foreign.to_str().unwrap()])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a backdrop state database"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&foreign).unwrap(), before, "not one byte changed");
    assert_eq!(env.sim.stats().await.submits, 0);
    for cmd in ["status", "report"] {
        let o = output({
            let mut c = env.cmd();
            c.arg(cmd).arg("--state").arg(&foreign);
            c
        })
        .await;
        assert_eq!(code(&o), 2, "{cmd}: {}", stderr(&o));
    }
    assert_eq!(std::fs::read(&foreign).unwrap(), before);
}

/// A catalog named `name` with SKUs `PREFIX-0`, `PREFIX-1`... whose images the simulator serves.
fn catalog_named(env: &TestEnv, name: &str, prefix: &str, rows: usize) -> PathBuf {
    let skus: Vec<String> = (0..rows).map(|i| format!("{prefix}-{i}")).collect();
    let written = env.catalog_with(&skus);
    let path = env.path(name);
    std::fs::rename(written, &path).unwrap();
    path
}

fn temp_files_under(dir: &Path) -> usize {
    let mut n = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                pending.push(e.path());
            } else if e.file_name().to_string_lossy().contains("backdrop-tmp") {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_output_folder_leaves_the_first_runs_downloads_alone() {
    // Slow downloads: the first run's temporary files exist for seconds.
    let faults = Faults { slow_rate: 1.0, slow_bytes_per_sec: 50_000, ..Faults::default() };
    let env = TestEnv::new(SimConfig { faults, ..SimConfig::default() }).await;
    let a = catalog_named(&env, "a.csv", "A", 3);
    let b = catalog_named(&env, "b.csv", "B", 2);
    let first = env.run_cmd(&a, &["--concurrency", "3"]).spawn().unwrap();
    let out_dir = env.out();
    wait_until("the first run's downloads in progress", || {
        let out_dir = out_dir.clone();
        async move { temp_files_under(&out_dir) > 0 }
    })
    .await;
    let second = output(env.run_cmd(&b, &["--state", env.path("b.db").to_str().unwrap()])).await;
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let first =
        tokio::time::timeout(Duration::from_secs(60), first.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(env.states().await.get("done"), Some(&3), "no paid row of the first run was lost");
    assert_eq!(env.verify_outputs().await, 3);
    assert_eq!(env.sim.ledger().await.len(), 5);
    assert_eq!(temp_files_under(&env.out()), 0, "nothing is left behind");
}
