//! The bad-input suite: property tests over the catalog reader and the template renderer
//! (arbitrary bytes, arbitrary column sets, arbitrary placeholders). Whatever comes in, the
//! answer is a plan or an error that says where the problem is; never a panic, never a request.

use std::path::Path;

use backdrop::catalog::CatalogError;
use backdrop::domain::ProviderKind;
use backdrop::plan::{PlanError, PlanInput};
use backdrop::prompt::{PromptError, Template};
use backdrop::store::Store;
use proptest::prelude::*;

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = runtime.block_on(Store::open(&dir.path().join("state.db"))).unwrap();
    std::fs::write(dir.path().join("prompt.txt"), "+++\ntask = \"generate\"\n+++\nA {name} on marble\n")
        .unwrap();
    Fixture { dir, store, runtime }
}

/// Dry-run plans `bytes` as a CSV catalog and checks the answer is a plan or a located error.
fn plan_bytes(f: &Fixture, bytes: &[u8]) -> Result<(), TestCaseError> {
    let catalog = f.dir.path().join("catalog.csv");
    std::fs::write(&catalog, bytes).unwrap();
    let template = Template::load(&f.dir.path().join("prompt.txt")).unwrap();
    let settings = PlanInput::new(catalog.clone(), template, ProviderKind::Seedance);
    match f.runtime.block_on(backdrop::plan::plan(&f.store, &settings, None)) {
        Ok(plan) => {
            prop_assert!(plan.render_text().contains("to run"));
        }
        Err(PlanError::Catalog(CatalogError::Invalid { problems, total, .. })) => {
            prop_assert!(total >= 1 && !problems.is_empty());
            for p in &problems {
                let text = p.to_string();
                prop_assert!(text.starts_with("line ") || text.starts_with("columns"), "{text}");
            }
        }
        Err(PlanError::Catalog(CatalogError::Unusable { message, .. })) => {
            prop_assert!(!message.is_empty());
        }
        Err(other) => return Err(TestCaseError::fail(format!("unexpected error: {other}"))),
    }
    Ok(())
}

fn cell() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9 _-]{0,12}",
        Just(String::new()),
        Just("\"quoted, with comma\"".to_owned()),
        Just("\"multi\nline\"".to_owned()),
        Just("{name}".to_owned()),
        "\\PC{0,8}",
    ]
}

fn column() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("sku".to_owned()),
        Just("name".to_owned()),
        Just("image_url".to_owned()),
        Just("image_urls".to_owned()),
        Just("prompt".to_owned()),
        "[a-z_]{1,8}",
        Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_give_a_plan_or_a_located_error(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let f = fixture();
        plan_bytes(&f, &bytes)?;
        // Behind a valid header too, so the row checks are reached.
        let mut with_header = b"sku,name\n".to_vec();
        with_header.extend_from_slice(&bytes);
        plan_bytes(&f, &with_header)?;
    }

    #[test]
    fn arbitrary_column_sets_give_a_plan_or_a_located_error(
        columns in proptest::collection::vec(column(), 1..6),
        rows in proptest::collection::vec(proptest::collection::vec(cell(), 0..7), 0..8),
        crlf in any::<bool>(),
        bom in any::<bool>(),
    ) {
        let f = fixture();
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = String::new();
        if bom {
            text.push('\u{feff}');
        }
        text.push_str(&columns.join(","));
        for row in rows {
            text.push_str(eol);
            text.push_str(&row.join(","));
        }
        plan_bytes(&f, text.as_bytes())?;
    }

    #[test]
    fn arbitrary_templates_parse_or_name_their_line(text in "(\\PC|[{}\n+=\"])*") {
        match Template::parse(Path::new("t.txt"), &text) {
            Ok(t) => {
                // Rendering with any values never panics; an unknown name is reported, not guessed.
                let mut out = String::new();
                let _ = t.body().render_into(&mut out, |name| (name.len() % 2 == 0).then_some("v{}}"));
            }
            Err(PromptError::Syntax { line, .. }) => {
                prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "line {line}");
            }
            Err(PromptError::FrontMatter { message, .. }) => prop_assert!(!message.is_empty()),
            Err(PromptError::Empty { .. }) => {}
            Err(other) => return Err(TestCaseError::fail(format!("unexpected: {other}"))),
        }
    }

    #[test]
    fn placeholders_render_exactly_their_values(
        names in proptest::collection::vec("[a-z]{1,6}", 1..5),
        value in "\\PC{0,10}",
    ) {
        let body: String = names.iter().map(|n| format!("[{{{n}}}]{{{{x}}}}")).collect();
        let t = Template::parse(Path::new("t.txt"), &body).unwrap();
        let mut out = String::new();
        t.body().render_into(&mut out, |_| Some(value.as_str())).unwrap();
        let expected: String = names.iter().map(|_| format!("[{value}]{{x}}")).collect();
        prop_assert_eq!(out, expected);
    }
}
