//! The layering holds: a module imports only from its own layer and the layers below it
//! (the order of `lib.rs`), the modules of a layer import each other one way only (no
//! cycle), and the data plane touches neither SQL nor gRPC. Read from the source, so a
//! new import that breaks it fails here, whatever it compiles to.

use std::collections::{BTreeMap, BTreeSet};
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

/// The modules of its own layer a source names as `crate::<layer>::<module>` (or in a
/// `crate::<layer>::{…}` list); a name that is no module of the layer only adds a node
/// without imports.
fn siblings(text: &str, layer: &str) -> BTreeSet<String> {
    let code = text.split(TESTS).next().unwrap_or_default();
    let prefix = format!("crate::{layer}::");
    let ident = |s: &str| -> String {
        (s.trim_start().chars())
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(&prefix) {
        let rest = &code[i + prefix.len()..];
        match rest.strip_prefix('{') {
            Some(list) => out.extend(
                list.split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(ident),
            ),
            None => {
                out.insert(ident(rest));
            }
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// A cycle among the modules of one layer in `src` (`layer::module` names, the first
/// repeated last), if there is one: such modules cannot be read or changed apart.
fn cycle(src: &Path) -> Option<Vec<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let parts: Vec<&str> = (file.strip_prefix(src).expect("under src").components())
            .filter_map(|c| c.as_os_str().to_str())
            .collect();
        let [layer, module, ..] = parts[..] else {
            continue;
        };
        let module = module.trim_end_matches(".rs");
        if module == "mod" || parts.last() == Some(&"tests.rs") {
            continue; // A layer's root wires its modules; unit tests are not read.
        }
        let text = std::fs::read_to_string(&file).expect("a readable source");
        let own = format!("{layer}::{module}");
        let imports = graph.entry(own.clone()).or_default();
        imports.extend((siblings(&text, layer).into_iter()).map(|m| format!("{layer}::{m}")));
        imports.remove(&own);
    }
    // Depth first, keeping the path: an import of a module on the path closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if !done.insert(node.to_owned()) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    (graph.keys()).find_map(|start| visit(start, &graph, &mut Vec::new(), &mut done))
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

#[test]
fn no_modules_of_a_layer_import_each_other_around() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    if let Some(found) = cycle(&src) {
        panic!("modules import each other: {}", found.join(" -> "));
    }
}

/// The check itself can fail: in a scratch tree, two modules importing each other (one
/// from a file in its folder, through a `{…}` list) are found; with the import back
/// removed, nothing is.
#[test]
fn a_cycle_of_imports_is_found() {
    let scratch = std::env::temp_dir().join(format!("latchkey-cycle-{}", std::process::id()));
    let tree = |back: &str| {
        std::fs::create_dir_all(scratch.join("dataplane/rules")).unwrap();
        std::fs::write(scratch.join("dataplane/mod.rs"), "pub mod rules;\n").unwrap();
        std::fs::write(
            scratch.join("dataplane/rules/reads.rs"),
            "use crate::dataplane::{names, facts::Recorded};\n",
        )
        .unwrap();
        std::fs::write(scratch.join("dataplane/facts.rs"), back).unwrap();
        std::fs::write(
            scratch.join("dataplane/names.rs"),
            "use crate::base::clock;\n",
        )
        .unwrap();
        cycle(&scratch)
    };
    let found = tree("use crate::dataplane::rules::Reads;\n");
    let fine = tree("use crate::dataplane::names;\n");
    std::fs::remove_dir_all(&scratch).unwrap();
    assert_eq!(
        found.as_deref(),
        Some(&["dataplane::facts", "dataplane::rules", "dataplane::facts"].map(String::from)[..])
    );
    assert_eq!(fine, None);
}
