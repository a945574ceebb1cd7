//! Tidy checks on the workspace's shape, in the spirit of rust-analyzer's: the simulator stands
//! alone (it depends on no backdrop crate), the library knows neither clap nor the simulator,
//! arrows between modules point down only, and every module is on `ARCHITECTURE.md`'s code map.
//! Each failure names the file and line (or the two modules) at fault.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The library's top-level modules, lowest first. A module may import only from rows above its
/// own; modules on the same row may not import each other. `crates/backdrop/src/lib.rs` and
/// `ARCHITECTURE.md` list them in this order.
const LIBRARY_LAYERS: &[&[&str]] = &[
    &["domain"],
    &["money"],
    &["quality"],
    &["prompt", "store", "provider"],
    &["fetch", "catalog"],
    &["preflight"],
    &["plan", "pipeline", "report"],
    &["progress"],
];

/// The binary's modules, lowest first, under the same rule (`main.rs` may use them all).
const BINARY_LAYERS: &[&[&str]] = &[&["exit"], &["cli"], &["config"], &["error"], &["command"]];

/// Each crate, its source folder, and the layers its modules follow.
const CRATES: &[(&str, &[&[&str]])] =
    &[("crates/backdrop/src", LIBRARY_LAYERS), ("src", BINARY_LAYERS), ("crates/backdrop-sim/src", &[])];

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read a source folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, &mut found);
    found.sort();
    assert!(!found.is_empty(), "no .rs files under {}", dir.display());
    found
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).expect("under the root").display().to_string()
}

/// The dependency names of one manifest, from every dependency table (target-specific ones too).
fn dependencies(manifest_path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(manifest_path)).expect("read a Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("Cargo.toml parses");
    let sections = ["dependencies", "dev-dependencies", "build-dependencies"];
    let mut tables: Vec<(String, &toml::Table)> = sections
        .iter()
        .filter_map(|s| manifest.get(*s).and_then(toml::Value::as_table).map(|t| ((*s).to_owned(), t)))
        .collect();
    for (cfg, target) in manifest.get("target").and_then(toml::Value::as_table).into_iter().flatten() {
        for section in sections {
            if let Some(table) = target.get(section).and_then(toml::Value::as_table) {
                tables.push((format!("target.{cfg}.{section}"), table));
            }
        }
    }
    let mut names = Vec::new();
    for (_, table) in tables {
        for (key, spec) in table {
            // A renamed dependency names its crate in `package`.
            names.push(spec.get("package").and_then(toml::Value::as_str).unwrap_or(key).to_owned());
        }
    }
    names
}

#[test]
fn the_simulator_depends_on_no_backdrop_crate() {
    let found: Vec<String> = dependencies("crates/backdrop-sim/Cargo.toml")
        .into_iter()
        .filter(|d| d.starts_with("backdrop"))
        .collect();
    assert!(found.is_empty(), "crates/backdrop-sim/Cargo.toml depends on backdrop crates: {found:?}");
}

#[test]
fn the_library_knows_neither_clap_nor_the_simulator() {
    let found: Vec<String> = dependencies("crates/backdrop/Cargo.toml")
        .into_iter()
        .filter(|d| d == "clap" || d.starts_with("backdrop"))
        .collect();
    assert!(found.is_empty(), "crates/backdrop/Cargo.toml must not depend on {found:?}");
}

/// Lines of `files` that mention `needle`, except in the files `allowed` accepts.
fn mentions(files: &[PathBuf], needle: &str, allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let name = relative(file);
        if allowed(&name) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if code.contains(needle) {
                found.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_the_binary_wiring_starts_the_simulator() {
    let mut files = rust_files(&root().join("src"));
    files.extend(rust_files(&root().join("crates/backdrop/src")));
    let found = mentions(&files, "backdrop_sim", |f| f == "src/cli.rs" || f.starts_with("src/command/"));
    assert!(
        found.is_empty(),
        "only src/cli.rs and src/command/ may use the simulator:\n{}",
        found.join("\n")
    );
}

#[test]
fn only_cli_config_and_command_use_clap() {
    let files = rust_files(&root().join("src"));
    let found = mentions(&files, "clap::", |f| {
        f == "src/cli.rs" || f == "src/config.rs" || f.starts_with("src/command/")
    });
    assert!(
        found.is_empty(),
        "clap types outside src/cli.rs, src/config.rs and src/command/:\n{}",
        found.join("\n")
    );
}

/// The top-level module a file belongs to: `store/writer.rs` and `store/mod.rs` are `store`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a path").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Every `crate::name` a line names, including `crate::{a, b}` groups.
fn crate_paths(line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        // `backdrop_sim::crate::` cannot occur; `$crate::` in macros would, and is not a module.
        let before = &rest[..at];
        rest = &rest[at + "crate::".len()..];
        if before.ends_with('$') || before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            names
                .extend(inner.split(',').map(|p| p.trim().split("::").next().unwrap_or_default().to_owned()));
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            names.push(name);
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

#[test]
fn arrows_point_down() {
    let mut violations = Vec::new();
    for (dir, layers) in CRATES {
        if layers.is_empty() {
            continue;
        }
        let src = root().join(dir);
        let layer_of = |module: &str| layers.iter().position(|row| row.contains(&module));
        for file in rust_files(&src) {
            let module = top_module(&src, &file);
            if module == "lib" || module == "main" {
                continue;
            }
            let Some(own) = layer_of(&module) else {
                violations.push(format!(
                    "{}: module `{module}` is in no layer of tests/integration/tidy.rs",
                    relative(&file)
                ));
                continue;
            };
            let text = std::fs::read_to_string(&file).expect("read a source file");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for used in crate_paths(code) {
                    if used == module {
                        continue;
                    }
                    match layer_of(&used) {
                        Some(layer) if layer < own => {}
                        Some(_) => violations.push(format!(
                            "{}:{}: `{module}` imports `{used}`, which is not below it",
                            relative(&file),
                            n + 1
                        )),
                        None => violations.push(format!(
                            "{}:{}: `{module}` imports `{used}`, which is in no layer",
                            relative(&file),
                            n + 1
                        )),
                    }
                }
            }
        }
    }
    assert!(violations.is_empty(), "arrows must point down:\n{}", violations.join("\n"));
}

#[test]
fn every_module_is_on_the_code_map() {
    let map = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let mut missing = Vec::new();
    for (dir, _) in CRATES {
        let crate_dir = dir.trim_end_matches("/src").trim_end_matches("src");
        let heading = if crate_dir.is_empty() {
            "### `backdrop` binary (`src/`)".to_owned()
        } else {
            format!("### `{crate_dir}`")
        };
        let Some(start) = map.find(&heading) else {
            missing.push(format!("no section headed {heading:?}"));
            continue;
        };
        let section = &map[start + heading.len()..];
        let section = &section[..section.find("\n### ").unwrap_or(section.len())];
        let named: BTreeSet<&str> = section.split('`').skip(1).step_by(2).collect();
        let src = root().join(dir);
        for file in rust_files(&src) {
            let rel = file.strip_prefix(&src).expect("under src").to_string_lossy().replace('\\', "/");
            let folder = rel.strip_suffix("mod.rs").map(str::to_owned);
            let listed = named.contains(rel.as_str()) || folder.as_deref().is_some_and(|f| named.contains(f));
            if !listed {
                missing.push(format!("{dir}/{rel} (under {heading})"));
            }
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md's code map misses:\n{}", missing.join("\n"));
}

#[test]
fn the_layer_checker_reads_grouped_and_inline_paths() {
    assert_eq!(crate_paths("use crate::store::{Store, JobState};"), ["store"]);
    assert_eq!(crate_paths("use crate::{money::Unit, domain::Task};"), ["money", "domain"]);
    assert_eq!(crate_paths("let x = crate::money::cap(a, b, c);"), ["money"]);
    assert_eq!(crate_paths("backdrop_crate::x; $crate::y"), Vec::<String>::new());
}
