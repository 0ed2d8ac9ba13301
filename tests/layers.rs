//! The layers of DESIGN.md §2 only point down: every `crate::` path in `src/` (the library)
//! names a module of a lower layer, or the file's own top-level module. This test reads the
//! sources, so a new upward import fails CI with the file, the line and the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first. A module may import only modules of a lower rank.
const LAYERS: &[(&str, u32)] = &[
    ("sys", 0),
    ("vendor", 1),
    ("error", 2),
    ("policy", 3),
    ("config", 4),
    ("logging", 5),
    ("backend", 5),
    ("keystore", 6),
    ("audit", 6),
    ("runtime", 7),
    ("service", 7),
    ("ffi", 8),
    ("daemon", 9),
];

fn rank(m: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == m).map(|(_, r)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().unwrap() != "bin" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The names a line imports through `crate::` (also `crate::{a, b::c}`).
fn imported(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = &rest[..i];
        rest = &rest[i + "crate::".len()..];
        // `$crate::` in macros and names like `cmkp11crate::` are not this crate's paths.
        if before.ends_with('$') || before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(inner) = rest.strip_prefix('{') {
            let inner = inner.split('}').next().unwrap_or("");
            for part in inner.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn imports_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut unknown = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" {
            continue;
        }
        let Some(own) = rank(&top) else {
            unknown.insert(top.clone(), rel.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            for m in imported(line) {
                if m == top {
                    continue;
                }
                match rank(&m) {
                    Some(r) if r < own => {}
                    Some(r) => bad.push(format!(
                        "src/{}:{}: `{top}` (layer {own}) imports `crate::{m}` (layer {r}): \
                         only lower layers may be imported",
                        rel.display(),
                        n + 1
                    )),
                    None => {
                        unknown.insert(m, format!("src/{}:{}", rel.display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS in tests/layers.rs: {unknown:?}"
    );
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn unsafe_code_is_denied_at_the_root() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    assert!(lib.contains("#![deny(unsafe_code)]"));
    // The named exceptions: the ABI, the OS floor and the backend's function table.
    let allows = lib.matches("#[allow(unsafe_code)]").count();
    assert_eq!(
        allows, 2,
        "src/lib.rs allows unsafe code on ffi and sys only"
    );
}
