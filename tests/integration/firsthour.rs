//! The first hour with backdrop (issue 16): a plan that cannot run says so before anything is
//! sent, stdout carries data and stderr messages, a dry run leaves no files, simulator request
//! ids never repeat across instances, the run's model is recorded, `report` does not pour HTML
//! onto a terminal, and the gallery names each product.

use std::path::Path;

use backdrop_sim::SimConfig;

use crate::harness::{Sim, TestEnv, code, output, stderr};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `backdrop run` on the repository's sample catalog (its pictures are local files), with the
/// state and the outputs in the test's folder.
fn sample_run(env: &TestEnv, extra: &[&str]) -> tokio::process::Command {
    sample_run_at(env, &env.state(), &env.out(), extra)
}

/// [`sample_run`] with the state file and the output folder at `state` and `out`.
fn sample_run_at(
    env: &TestEnv,
    state: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> tokio::process::Command {
    let mut cmd = env.cmd();
    cmd.arg("run")
        .arg(root().join("sample-catalog.csv"))
        .arg("--prompt")
        .arg(root().join("prompts/marble-counter.txt"))
        .arg("--state")
        .arg(state)
        .arg("--out")
        .arg(out)
        .args(["--poll-initial", "20ms", "--poll-max", "100ms", "--rate", "1000/s"])
        .args(extra);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_without_inline_images_are_refused_at_plan_time_with_every_line() {
    let env = TestEnv::plain().await;
    let base = env.sim.base_url();
    for extra in [&[][..], &["--dry-run"][..]] {
        let out = output(sample_run(&env, &[&["--api-base", &base][..], extra].concat())).await;
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{extra:?}: {err}");
        assert!(err.contains("12 problems"), "{err}");
        assert!(
            err.contains(
                "line 2: image \"samples/mug-white.png\": is a local file: pass --inline-local-images"
            ),
            "{err}"
        );
        assert!(err.contains("line 13: image \"samples/headphones-red.png\""), "every row is listed: {err}");
        assert!(stdout(&out).is_empty(), "no plan is printed for a plan that cannot run");
    }
    assert_eq!(env.sim.stats().await.submits, 0, "nothing was sent");
    assert_eq!(listing(env.dir.path()), Vec::<String>::new(), "a refused plan leaves no state file behind");

    // With the flag the same catalog plans and runs.
    let out = output(sample_run(&env, &["--api-base", &base, "--inline-local-images"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(env.states().await.get("done"), Some(&12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_invalid_runs_the_url_rows_and_lists_the_local_files() {
    let env = TestEnv::plain().await;
    std::fs::copy(root().join("samples/mug-white.png"), env.path("mug.png")).unwrap();
    let catalog = env.path("mixed.csv");
    std::fs::write(
        &catalog,
        format!(
            "sku,name,color,image_url\nURL-1,Mug,blue,{}/__sim/input/a.png\nFILE-1,Mug,red,mug.png\n",
            env.sim.base_url()
        ),
    )
    .unwrap();
    let out = output(env.run_cmd(&catalog, &["--skip-invalid"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("Skipped 1 invalid rows:\n  line 3: image \"mug.png\": is a local file"), "{text}");
    let states = env.states().await;
    assert_eq!(states.get("done"), Some(&1), "{states:?}");
    assert_eq!(states.values().sum::<i64>(), 1, "the local-file row is not planned: {states:?}");
    assert_eq!(env.sim.ledger().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_runs_the_sample_with_simulate() {
    let env = TestEnv::plain().await;
    let out = output(sample_run(&env, &["--simulate"])).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert_eq!(env.states().await.get("done"), Some(&12));
    assert!(err.contains("To try crash-resume, start `backdrop sim`"), "the --simulate note: {err}");
}

/// The quick start with the quality gate on, inline (seedance) and uploaded (fal): the
/// simulator edits the sample photos themselves, faithfully, so every row passes the gate, the
/// white mug, the white sneaker and the clear glass on the light marble included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_with_the_gate_passes_every_sample() {
    let env = TestEnv::plain().await;
    for provider in ["seedance", "fal"] {
        let state = env.path(&format!("{provider}.db"));
        let out_dir = env.path(&format!("{provider}-out"));
        let cmd = sample_run_at(&env, &state, &out_dir, &["--simulate", "--provider", provider]);
        let out = output(cmd).await;
        let err = stderr(&out);
        let store = backdrop::store::Store::open(&state).await.unwrap();
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT sku, state FROM jobs ORDER BY sku").fetch_all(store.pool()).await.unwrap();
        store.close().await;
        assert_eq!(rows.len(), 12, "{provider}");
        for (sku, state) in &rows {
            assert_eq!(state, "done", "{provider} {sku} is faithful and passes the gate: {err}");
        }
        assert_eq!(code(&out), 0, "{provider}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_summary_go_to_stdout_and_messages_to_stderr_in_run_and_dry_run() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(3);
    let dry = output(env.run_cmd(&catalog, &["--dry-run"])).await;
    assert_eq!(code(&dry), 0, "{}", stderr(&dry));
    let run = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&run), 0, "{}", stderr(&run));
    for (what, out) in [("dry run", &dry), ("run", &run)] {
        let (text, err) = (stdout(out), stderr(out));
        assert!(text.starts_with("Plan for "), "{what}: the plan is on stdout: {text}");
        assert!(text.contains("First prompts to send:\n  SKU-0000: Place the blue Mug 0"), "{what}: {text}");
        assert!(!err.contains("Plan for"), "{what}: the plan is not repeated on stderr: {err}");
    }
    let both = format!("{}{}", stdout(&dry), stderr(&dry));
    assert_eq!(both.matches("nothing was sent").count(), 1, "said once: {both}");
    assert!(stdout(&run).contains("done, 0 failed this run"), "the summary is data: {}", stdout(&run));

    // Only rows that will be sent are shown: the done ones are not, and with nothing to send
    // there is no such section.
    let more = env.catalog(5);
    let dry = output(env.run_cmd(&more, &["--dry-run"])).await;
    let text = stdout(&dry);
    assert!(text.contains("First prompts to send:\n  SKU-0003: "), "{text}");
    assert!(!text.contains("SKU-0000:"), "a done row is not a prompt to send: {text}");
    let out = output(env.run_cmd(&more, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let dry = output(env.run_cmd(&more, &["--dry-run"])).await;
    assert!(!stdout(&dry).contains("First prompts"), "{}", stdout(&dry));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_or_a_refused_run_on_a_fresh_state_path_leaves_no_files() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(2);
    env.prompt();
    let before = listing(env.dir.path());
    let out = output(env.run_cmd(&catalog, &["--dry-run"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("new 2"), "{}", stdout(&out));
    assert_eq!(listing(env.dir.path()), before, "no x.db, -wal, -shm or .lock after a dry run");

    // A run whose plan fails on a fresh path takes its state file away again.
    let bad = env.path("bad.csv");
    std::fs::write(&bad, "sku,name,color,image_url\n,Mug,blue,https://cdn.example.com/a.png\n").unwrap();
    let before = listing(env.dir.path());
    let out = output(env.run_cmd(&bad, &[])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(listing(env.dir.path()), before, "{}", stderr(&out));

    // A state file with data is never removed, whatever fails later, and a dry run does not
    // leave its -wal or -shm beside it.
    let out = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = output(env.run_cmd(&bad, &[])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = output(env.run_cmd(&catalog, &["--dry-run"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let names = listing(env.dir.path());
    assert!(!names.iter().any(|n| n.ends_with("-wal") || n.ends_with("-shm")), "{names:?}");
    // Read last: the test's own connection keeps a -wal and -shm open while it lives.
    assert_eq!(env.states().await.get("done"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_path_is_reported_once_and_before_a_missing_key() {
    let env = TestEnv::plain().await;
    let mut cmd = env.cmd();
    cmd.env_remove("SEEDANCE_API_KEY").args(["run", "missing.csv", "--prompt", "prompt.txt"]);
    let out = output(cmd).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(err.contains("cannot read catalog missing.csv"), "{err}");
    assert_eq!(err.matches("(os error 2)").count(), 1, "the OS error once: {err}");
    assert!(!err.contains("SEEDANCE_API_KEY"), "the path comes first: {err}");

    env.prompt();
    let catalog = env.catalog(1);
    let mut cmd = env.cmd();
    cmd.env_remove("SEEDANCE_API_KEY").arg("run").arg(&catalog).args(["--prompt", "nope.txt"]);
    let err = stderr(&output(cmd).await);
    assert!(err.contains("cannot read prompt template nope.txt"), "{err}");
    assert_eq!(listing(env.dir.path()), ["catalog.csv", "prompt.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_simulators_with_the_same_seed_never_share_a_request_id() {
    let first = TestEnv::plain().await;
    let second = Sim::start(SimConfig::default()).await;
    let catalog = first.catalog(3);
    let out = output(first.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The second simulator does not draw the first one's pictures: its edits are not faithful
    // to these inputs, and the quality gate is not what this test is about.
    let mut again =
        first.run_cmd(&catalog, &["--state", "other.db", "--out", "other-out", "--no-quality-gate"]);
    again.args(["--api-base", &second.base_url()]);
    let out = output(again).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let ids = |ledger: Vec<crate::harness::Charge>| -> Vec<String> {
        ledger.into_iter().map(|c| c.request_id).collect()
    };
    let (a, b) = (ids(first.sim.ledger().await), ids(second.ledger().await));
    assert_eq!((a.len(), b.len()), (3, 3));
    assert!(a.iter().all(|id| !b.contains(id)), "{a:?} vs {b:?}");
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_records_its_model_and_the_gallery_names_products() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(2);
    let out = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut status = env.cmd();
    status.args(["status", "--json", "--state"]).arg(env.state());
    let status: serde_json::Value = serde_json::from_slice(&output(status).await.stdout).unwrap();
    assert_eq!(status["last_run"]["model"], "seedream-v4-5", "{status}");

    let mut report = env.cmd();
    report.args(["report", "--state"]).arg(env.state()).arg("--out").arg(env.out());
    let out = output(report).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let html = stdout(&out);
    assert!(html.contains("with seedance seedream-v4-5)"), "the header names the model");
    assert!(html.contains("<span class=\"sku\">SKU-0001</span> <span class=\"name\">Mug 1</span>"));
    let mut json = env.cmd();
    json.args(["report", "--format", "json", "--state"]).arg(env.state());
    let json: serde_json::Value = serde_json::from_slice(&output(json).await.stdout).unwrap();
    assert_eq!(json["rows"][0]["name"], "Mug 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_html_goes_to_stdout_when_piped_and_to_a_file_at_a_terminal() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(1);
    let out = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = || {
        let mut cmd = env.cmd();
        cmd.args(["report", "--state"]).arg(env.state()).arg("--out").arg(env.out());
        cmd
    };
    let piped = output(report()).await;
    assert_eq!(code(&piped), 0, "{}", stderr(&piped));
    assert!(stdout(&piped).starts_with("<!DOCTYPE html>"));
    assert!(!env.path("report.html").exists(), "piped, nothing is written to a file");

    // A pseudo-terminal (util-linux `script`).
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("no `script` here: the terminal case is covered by the unit test only");
        return;
    }
    let at_terminal = || {
        let std_cmd = report();
        let std_cmd = std_cmd.as_std();
        let mut line = quote(&std_cmd.get_program().to_string_lossy());
        for a in std_cmd.get_args() {
            line.push(' ');
            line.push_str(&quote(&a.to_string_lossy()));
        }
        let mut script = tokio::process::Command::new("script");
        script.args(["-qec", &line, "/dev/null"]).current_dir(env.dir.path());
        script
    };
    let out = output(at_terminal()).await;
    let screen = stdout(&out);
    assert_eq!(code(&out), 0, "{screen}");
    assert!(!screen.contains("<!DOCTYPE"), "no HTML on the terminal: {screen}");
    assert!(screen.contains("report.html"), "says where it went: {screen}");
    let written = std::fs::read_to_string(env.path("report.html")).unwrap();
    assert!(written.starts_with("<!DOCTYPE html>"));

    let out = output(at_terminal()).await;
    assert_eq!(code(&out), 2, "an existing report.html is not replaced: {}", stdout(&out));
    assert!(stdout(&out).contains("--output report.html"), "{}", stdout(&out));
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_failure_reads_once_and_retrying_it_warns_of_the_charge() {
    let env = TestEnv::plain().await;
    let catalog = env.path("fail.csv");
    std::fs::write(
        &catalog,
        format!(
            "sku,name,color,image_url,prompt\nF-1,Mug,blue,{}/__sim/input/a.png,a mug [sim:fail]\n",
            env.sim.base_url()
        ),
    )
    .unwrap();
    let out = output(env.run_cmd(&catalog, &[])).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    // `status` gives the reason once, not "generation failed: generation failed: …".
    let mut status = env.cmd();
    status.args(["status", "--state"]).arg(env.state());
    let text = stdout(&output(status).await);
    assert_eq!(text.matches("generation failed").count(), 1, "the reason is not doubled: {text}");

    // The provider charged for the row: a plain `retry --failed` leaves it, naming the request
    // and the flag that pays again; `--pay-again` re-queues it under a warning.
    let mut retry = env.cmd();
    retry.args(["retry", "--failed", "--state"]).arg(env.state());
    let out = output(retry).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("F-1: left as failed: the provider already charged for it (request req_"),
        "{text}"
    );
    assert!(text.contains("--pay-again"), "{text}");
    assert_eq!(env.states().await.get("failed"), Some(&1));
    let mut retry = env.cmd();
    retry.args(["retry", "--failed", "--pay-again", "--state"]).arg(env.state());
    let out = output(retry).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("the next run pays for them again"), "{text}");
    assert_eq!(env.states().await.get("pending"), Some(&1));
}
