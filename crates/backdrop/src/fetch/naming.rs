//! The output naming rule: where output `index` of a SKU goes under the output folder
//! ([`output_path`]), safe and collision-free for any SKU a catalog can hold.

use std::path::{Component, PathBuf};

use sha2::{Digest as _, Sha256};

/// The default output name template, relative to the output folder.
pub const DEFAULT_OUTPUT_NAME: &str = "{sku}/{index}.{ext}";

/// Longest path component built from a SKU, in bytes (filesystems allow 255).
const MAX_COMPONENT: usize = 120;
/// Longest readable stem kept in front of a hashed SKU's suffix.
const MAX_STEM: usize = 100;
/// Hex characters of sha256(sku) appended to a SKU that is not kept verbatim.
const HASH_CHARS: usize = 10;

/// The path of output `index` of `sku`, relative to the output folder, from a template with
/// `{sku}`, `{index}` and `{ext}` placeholders (`/` separates folders).
///
/// A SKU is used verbatim when it is 1–120 bytes of `[A-Z0-9._-]` (no lowercase letters, so two
/// verbatim names never differ only by case), does not start or end with `.`, and is not a
/// Windows device name (`CON`, `NUL.X`, `COM1`...). Any other SKU becomes a lowercased stem of
/// `[a-z0-9_-]` (at most 100 bytes) + `~` + the first 10 hex digits of sha256(sku). Verbatim
/// names never contain `~`, stems never do, so the two forms cannot meet; two hashed names meet
/// only if both their stems and 40 bits of their hashes agree. Every `.`, `..` or empty component
/// the template itself produces is neutralised, so the result always stays inside the folder.
#[must_use]
pub fn output_path(template: &str, sku: &str, index: u32, ext: &str) -> PathBuf {
    let sku_part = sku_component(sku);
    let ext: String = ext.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let mut path = PathBuf::new();
    for part in template.split(['/', '\\']) {
        let filled =
            part.replace("{sku}", &sku_part).replace("{index}", &index.to_string()).replace("{ext}", &ext);
        match filled.as_str() {
            "" | "." => {}
            ".." => path.push("__"),
            _ => path.push(strip_controls(&filled)),
        }
    }
    if path.as_os_str().is_empty() {
        path.push(format!("{sku_part}-{index}.{ext}"));
    }
    debug_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
    path
}

/// Template text is the user's, but must not smuggle control bytes or a drive prefix in.
fn strip_controls(part: &str) -> String {
    part.chars().map(|c| if c.is_control() || c == ':' { '_' } else { c }).collect()
}

fn sku_component(sku: &str) -> String {
    if is_verbatim(sku) {
        return sku.to_owned();
    }
    let mut stem = String::with_capacity(sku.len().min(MAX_STEM));
    for c in sku.chars() {
        if stem.len() >= MAX_STEM {
            break;
        }
        let c = c.to_ascii_lowercase();
        stem.push(if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' { c } else { '_' });
    }
    let digest = Sha256::digest(sku.as_bytes());
    let hash = hex::encode(digest);
    format!("{stem}~{}", &hash[..HASH_CHARS])
}

fn is_verbatim(sku: &str) -> bool {
    !sku.is_empty()
        && sku.len() <= MAX_COMPONENT
        && sku
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && !sku.starts_with('.')
        && !sku.ends_with('.')
        && !is_windows_reserved(sku)
}

/// `CON`, `PRN`, `AUX`, `NUL`, `COM0-9`, `LPT0-9`, alone or before an extension.
fn is_windows_reserved(name: &str) -> bool {
    let base = name.split('.').next().unwrap_or(name).to_ascii_uppercase();
    matches!(base.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((base.starts_with("COM") || base.starts_with("LPT"))
            && base.len() == 4
            && base.as_bytes()[3].is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;

    const T: &str = DEFAULT_OUTPUT_NAME;

    #[test]
    fn safe_skus_are_kept_verbatim() {
        assert_eq!(output_path(T, "SKU-00123", 1, "png"), PathBuf::from("SKU-00123/1.png"));
        assert_eq!(output_path(T, "AB_12.V2", 0, "jpg"), PathBuf::from("AB_12.V2/0.jpg"));
        assert_eq!(output_path("{sku}-{index}.{ext}", "X1", 3, "png"), PathBuf::from("X1-3.png"));
    }

    #[test]
    fn unsafe_skus_get_a_readable_stem_and_a_hash() {
        let p = output_path(T, "abc", 1, "png");
        let name = p.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        assert!(name.starts_with("abc~") && name.len() == 4 + HASH_CHARS, "{name}");
        let p = output_path(T, "a/b", 1, "png");
        assert_eq!(p.components().count(), 2, "{p:?}");
    }

    fn nasty() -> Vec<String> {
        let mut v: Vec<String> = [
            "a/b",
            "a_b",
            "a\\b",
            "..",
            ".",
            "",
            "...",
            "CON",
            "con",
            "NUL",
            "NUL.TXT",
            "COM1",
            "LPT9",
            "COM",
            "ABC",
            "abc",
            "Abc",
            "ABC.",
            "ABC~1",
            "abc~",
            "a\0b",
            "a\nb",
            "a\tb",
            "/etc/passwd",
            "../../x",
            "C:\\x",
            "C:",
            "~",
            "-",
            "_",
            ".hidden",
            "é",
            "E\u{301}",
            "É",
            "sku 1",
            "SKU 1",
            "SKU_1",
            "SKU-1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.push("A".repeat(300));
        v.push(format!("{}B", "A".repeat(299)));
        v.push("a".repeat(300));
        v.push("ü".repeat(150));
        v.push("A".repeat(120));
        v.push("A".repeat(121));
        v
    }

    fn assert_inside(p: &Path) {
        assert!(!p.as_os_str().is_empty());
        for c in p.components() {
            let Component::Normal(name) = c else { panic!("{p:?} has {c:?}") };
            let name = name.to_string_lossy();
            assert!(name.len() <= 255, "{p:?}");
            assert!(!name.chars().any(char::is_control), "{p:?}");
            assert!(!name.contains(':'), "{p:?}");
        }
    }

    #[test]
    fn nasty_skus_stay_inside_and_never_collide_even_ignoring_case() {
        let mut seen: HashMap<String, String> = HashMap::new();
        for sku in nasty() {
            let p = output_path(T, &sku, 1, "png");
            assert_inside(&p);
            let first = p.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
            assert!(first.len() <= MAX_COMPONENT, "{sku:?} -> {first}");
            assert!(!is_windows_reserved(&first), "{sku:?} -> {first}");
            let key = p.to_string_lossy().to_lowercase();
            if let Some(other) = seen.insert(key.clone(), sku.clone()) {
                panic!("{sku:?} and {other:?} both map to {key}");
            }
        }
    }

    #[test]
    fn template_components_cannot_escape() {
        let p = output_path("../{sku}/./{index}.{ext}", "A", 1, "png");
        assert_eq!(p, PathBuf::from("__/A/1.png"));
        let p = output_path("/abs/{sku}-{index}.{ext}", "A", 1, "p/../ng");
        assert_inside(&p);
        assert!(!p.is_absolute());
    }

    proptest! {
        #[test]
        fn every_sku_stays_inside(sku in any::<String>(), index in any::<u32>()) {
            let p = output_path(T, &sku, index, "png");
            assert_inside(&p);
            prop_assert_eq!(p.components().count(), 2);
        }

        #[test]
        fn distinct_skus_never_share_a_path_ignoring_case(a in "[ -~]{0,20}", b in "[ -~]{0,20}") {
            prop_assume!(a != b);
            let pa = output_path(T, &a, 1, "png").to_string_lossy().to_lowercase();
            let pb = output_path(T, &b, 1, "png").to_string_lossy().to_lowercase();
            prop_assert_ne!(pa, pb);
        }
    }
}
