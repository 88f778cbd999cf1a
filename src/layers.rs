//! The layering holds: a module imports only from its own layer and the layers below it
//! (the order of `lib.rs`), and the data plane touches neither SQL nor gRPC. Read from
//! the source, so a new import that breaks it fails here, whatever it compiles to.

use std::path::{Path, PathBuf};

/// Bottom to top. `envoy` and `control` share a rank: neither may import the other.
const LAYERS: [(&str, u8); 9] = [
    ("base", 0),
    ("policy", 1),
    ("store", 2),
    ("telemetry", 3),
    ("dataplane", 4),
    ("envoy", 5),
    ("control", 5),
    ("serve", 6),
    ("cli", 7),
];

/// Where a file's unit tests begin.
const TESTS: &str = "#[cfg(test)]\nmod tests {";

/// Generated protocol code, which imports nothing of latchkey's: usable from any layer.
const GENERATED: [&str; 2] = ["pb", "access_log_pb"];

fn rank(layer: &str) -> Option<u8> {
    LAYERS.iter().find(|(name, _)| *name == layer).map(|l| l.1)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<layer>` a source names, with its line number. A file's unit tests
/// (its `#[cfg(test)] mod tests`, last in the file) may drive it with the real parts
/// above it and are not read.
fn imports(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let code = text.split(TESTS).next().unwrap_or_default();
    for (n, line) in code.lines().enumerate() {
        for (i, _) in line.match_indices("crate::") {
            // `latchkey::`-style paths of other crates end in `crate::` too: `$crate::`.
            if line[..i].ends_with('$') {
                continue;
            }
            let rest = &line[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            out.push((n + 1, name));
        }
    }
    out
}

/// The violations in `src`: each file's imports checked against its layer.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        let Some(layer) = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .filter(|_| relative.components().count() > 1)
        else {
            continue; // lib.rs, main.rs, this file: the crate's root wires the layers.
        };
        let own = rank(layer).unwrap_or_else(|| panic!("{layer}/ is not a layer in LAYERS"));
        // A module's unit tests kept in a file of their own, read as its `mod tests`.
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a readable source");
        for (line, name) in imports(&text) {
            let at = format!("{}:{line}", relative.display());
            if name.starts_with('{') {
                found.push(format!(
                    "{at}: `crate::{{…}}` hides which layers it imports"
                ));
                continue;
            }
            if GENERATED.contains(&name.as_str()) || name == layer {
                continue;
            }
            match rank(&name) {
                Some(r) if r < own => {}
                Some(_) => found.push(format!("{at}: {layer} imports {name}, above or beside it")),
                None => found.push(format!("{at}: crate::{name} is not in a layer")),
            }
        }
        if layer == "dataplane" {
            let code = text.split(TESTS).next().unwrap_or_default();
            for word in ["sqlx", "tonic", "crate::store"] {
                if code.contains(word) {
                    found.push(format!(
                        "{}: the data plane uses {word}",
                        relative.display()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn each_layer_imports_only_from_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

/// The check itself can fail: an import upwards in a scratch tree is found.
#[test]
fn an_upward_import_is_found() {
    let scratch = std::env::temp_dir().join(format!("latchkey-layers-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("store")).unwrap();
    std::fs::write(
        scratch.join("store/mod.rs"),
        "use crate::base::clock;\nuse crate::dataplane::Shared;\n\
         #[cfg(test)]\nmod tests {\n    use crate::serve;\n}\n",
    )
    .unwrap();
    std::fs::create_dir_all(scratch.join("dataplane")).unwrap();
    std::fs::write(scratch.join("dataplane/mod.rs"), "use sqlx::Any;\n").unwrap();
    let found = violations(&scratch);
    std::fs::remove_dir_all(&scratch).unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].contains("store imports dataplane")
            || found[1].contains("store imports dataplane")
    );
}
