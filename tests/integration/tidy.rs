//! Tidy checks on the workspace's shape: the simulator stands alone (it depends on no backdrop
//! crate), and the client under `src/` never reaches into it; only the binary's wiring
//! (`src/cli.rs`, `src/command/`) may start it.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_simulator_depends_on_no_backdrop_crate() {
    let manifest_path = "crates/backdrop-sim/Cargo.toml";
    let text = std::fs::read_to_string(root().join(manifest_path)).expect("read the simulator's Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("the simulator's Cargo.toml parses");
    let mut found = Vec::new();
    let mut check = |where_: String, table: &toml::Table| {
        for (key, spec) in table {
            // A renamed dependency names its crate in `package`.
            let name = spec.get("package").and_then(toml::Value::as_str).unwrap_or(key);
            if name.starts_with("backdrop") {
                found.push(format!("[{where_}] {key}"));
            }
        }
    };
    let sections = ["dependencies", "dev-dependencies", "build-dependencies"];
    for section in sections {
        if let Some(table) = manifest.get(section).and_then(toml::Value::as_table) {
            check(section.to_owned(), table);
        }
    }
    let targets = manifest.get("target").and_then(toml::Value::as_table).into_iter().flatten();
    for (cfg, target) in targets {
        for section in sections {
            if let Some(table) = target.get(section).and_then(toml::Value::as_table) {
                check(format!("target.{cfg}.{section}"), table);
            }
        }
    }
    assert!(found.is_empty(), "{manifest_path} depends on backdrop crates: {found:?}");
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn only_the_binary_wiring_mentions_the_simulator() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .rs files under {}", src.display());
    let mut offenders = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(root()).expect("under the root");
        let allowed = relative == Path::new("src/cli.rs") || relative.starts_with("src/command");
        if allowed {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            if line.contains("backdrop_sim") {
                offenders.push(format!("{}:{}: {}", relative.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "only src/cli.rs and src/command/ may use the simulator:\n{}",
        offenders.join("\n")
    );
}
