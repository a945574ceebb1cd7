//! Prompts are checked before anything is sent (issue 15, item 16): a rendered prompt longer
//! than the limit, or holding a control character, is a catalog error naming its line (or, with
//! `--skip-invalid`, a skipped row); and text from the catalog never reaches the terminal raw.

use crate::harness::{TestEnv, all_output, code, output, stderr};

/// Writes a catalog whose `name` cells are `names` (each row's image is the simulator's).
fn catalog_with_names(env: &TestEnv, names: &[String]) -> std::path::PathBuf {
    let mut text = String::from("sku,name,color,image_url\n");
    for (i, name) in names.iter().enumerate() {
        let url = env.sim.input_url(&format!("img{i}"));
        text.push_str(&format!("SKU-{i},\"{}\",blue,{url}\n", name.replace('"', "\"\"")));
    }
    let path = env.path("catalog.csv");
    std::fs::write(&path, text).unwrap();
    path
}

/// The raw control bytes a terminal would obey.
fn raw_controls(text: &[u8]) -> Vec<u8> {
    text.iter().copied().filter(|b| matches!(b, 0x00..=0x08 | 0x0b..=0x0c | 0x0e..=0x1f | 0x7f)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_control_character_prompt_is_refused_naming_its_line() {
    let env = TestEnv::plain().await;
    let names = vec![
        "mug".to_owned(),
        "x".repeat(1_000_000),              // line 3: a runaway cell
        "teapot \u{1b}[2J\u{7}".to_owned(), // line 4: ESC and BEL
        "vase\0".to_owned(),                // line 5: NUL
        "jug\r\nwith a CR".to_owned(),      // line 6: CR and LF are text
    ];
    let catalog = catalog_with_names(&env, &names);
    let out = output(env.run_cmd(&catalog, &[])).await;
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains(
            "line 3: the prompt is longer than 10000 characters (1000044 in all) (from column name)"
        ),
        "{err}"
    );
    assert!(err.contains("line 4: the prompt holds a control character, U+001B (ESC)"), "{err}");
    assert!(err.contains("line 5: the prompt holds a control character, U+0000 (NUL)"), "{err}");
    assert!(!err.contains("line 6"), "CR and LF are allowed: {err}");
    assert_eq!(env.sim.stats().await.submits, 0, "nothing was sent");
    assert!(raw_controls(&out.stderr).is_empty(), "raw control bytes on the terminal: {err:?}");

    // With --skip-invalid the three are listed and left out; the others run.
    let out = output(env.run_cmd(&catalog, &["--skip-invalid"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(all_output(&out).contains("Skipped 3 invalid rows:"), "{}", all_output(&out));
    assert_eq!(env.states().await.get("done"), Some(&2));
    assert_eq!(env.sim.ledger().await.len(), 2);
    assert!(raw_controls(&out.stderr).is_empty(), "{:?}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_text_is_escaped_in_the_plan_sample() {
    let env = TestEnv::plain().await;
    // A carriage return is allowed in a prompt, but printed raw it would let the rest of the
    // line overwrite the start of it.
    let catalog = catalog_with_names(&env, &["mug\rFAKE".to_owned()]);
    let out = output(env.run_cmd(&catalog, &["--dry-run"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SKU-0: Place the blue mug\\rFAKE on a polished marble counter"), "{stdout}");
    assert!(!out.stdout.contains(&b'\r'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_character_in_the_template_names_the_template_line() {
    let env = TestEnv::plain().await;
    let catalog = env.catalog(2);
    let prompt = env.path("bell.txt");
    std::fs::write(&prompt, "+++\nmodel = \"seedream-v4-5\"\n+++\nPlace the {name}\non oak \u{7}\n").unwrap();
    let mut cmd = env.run_cmd(&catalog, &[]);
    cmd.arg("--prompt").arg(&prompt);
    let out = output(cmd).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("bell.txt: line 5: control character U+0007 (BEL)"), "{}", stderr(&out));
    assert_eq!(env.sim.stats().await.submits, 0);
}
