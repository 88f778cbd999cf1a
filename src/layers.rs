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

/// A source in a layer's folder: its path from `src`, that path's parts, and its code
/// (`code_of`).
struct Source {
    path: PathBuf,
    parts: Vec<String>,
    code: String,
}

/// The sources in the layers' folders. Not the crate root's files (`lib.rs`, `main.rs`,
/// this one), which wire the layers, nor a module's unit tests kept in a file of their
/// own (`tests.rs`), read as its `mod tests`.
fn layered_sources(src: &Path) -> Vec<Source> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut out = Vec::new();
    for file in files {
        let path = file.strip_prefix(src).expect("under src").to_path_buf();
        let parts: Vec<String> = (path.components())
            .filter_map(|c| Some(c.as_os_str().to_str()?.to_owned()))
            .collect();
        if parts.len() < 2 || parts.last().is_some_and(|p| p == "tests.rs") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).expect("a readable source"));
        out.push(Source { path, parts, code });
    }
    out
}

/// The violations in `src`: each file's imports checked against its layer.
fn violations(src: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for Source { path, parts, code } in layered_sources(src) {
        let layer = parts[0].as_str();
        let own = rank(layer).unwrap_or_else(|| panic!("{layer}/ is not a layer in LAYERS"));
        for (line, name) in named_after(&code, "crate::") {
            let at = format!("{}:{line}", path.display());
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
            for word in ["sqlx", "tonic", "crate::store"] {
                if code.contains(word) {
                    found.push(format!("{}: the data plane uses {word}", path.display()));
                }
            }
        }
    }
    found
}

/// What a source imports: its code without its unit tests (its `#[cfg(test)] mod
/// tests`, last in the file, may drive it with the real parts above it), comment lines
/// blanked so that lines keep their numbers.
fn code_of(text: &str) -> String {
    let code = text.split(TESTS).next().unwrap_or_default();
    (code.lines())
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> String {
    (s.trim_start().chars())
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The entries of a `{…}` list that `list` begins after its `{`, at its own depth.
fn entries(list: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(list[start..i].trim());
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

/// The first name of each path `code` writes after `prefix` (`crate::`,
/// `crate::policy::`, `super::`), with its line number: `file` of
/// `crate::policy::file::X`, and `a` and `b` of `crate::policy::{a::X, b}`.
fn named_after(code: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        // A longer path ending so (`$crate::`, `super::super::`) is not this one.
        if code[..i].ends_with(|c: char| "$_:".contains(c) || c.is_ascii_alphanumeric()) {
            continue;
        }
        let line = code[..i].matches('\n').count() + 1;
        let rest = &code[i + prefix.len()..];
        match rest.strip_prefix('{') {
            Some(list) => out.extend(entries(list).into_iter().map(|e| (line, ident(e)))),
            None => out.push((line, ident(rest))),
        }
    }
    out.retain(|(_, n)| !n.is_empty() && !["self", "super", "crate"].contains(&n.as_str()));
    out
}

/// The items a source defines (`fn`, `struct`, `const`, ...), by name.
fn defined(code: &str) -> BTreeSet<String> {
    const KINDS: [&str; 9] = [
        "fn", "struct", "enum", "trait", "type", "const", "static", "mod", "union",
    ];
    const QUALIFIERS: [&str; 6] = [
        "pub",
        "pub(crate)",
        "pub(super)",
        "async",
        "unsafe",
        "extern",
    ];
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let mut words = line
            .split_whitespace()
            .skip_while(|w| QUALIFIERS.contains(w));
        let (Some(mut kind), Some(mut name)) = (words.next(), words.next()) else {
            continue;
        };
        if kind == "const" && name == "fn" {
            (kind, name) = ("fn", words.next().unwrap_or_default());
        }
        if KINDS.contains(&kind) {
            out.insert(ident(name));
        }
    }
    out
}

/// One layer's modules, and where each name its root (`mod.rs`) offers comes from.
struct Layer {
    modules: BTreeSet<String>,
    /// Re-exported by the root (`pub use m::{A, B}`, `pub use m::*`): name to module.
    reexported: BTreeMap<String, String>,
    /// Defined in the root itself.
    own: BTreeSet<String>,
}

impl Layer {
    fn read(dir: &Path) -> Self {
        let read = |p: PathBuf| {
            std::fs::read_to_string(p)
                .map(|t| code_of(&t))
                .unwrap_or_default()
        };
        let mut modules = BTreeSet::new();
        for entry in std::fs::read_dir(dir).expect("a layer's folder is readable") {
            let name = entry.expect("a directory entry").file_name();
            let name = name.to_str().expect("a UTF-8 file name");
            if name != "mod.rs" {
                modules.insert(name.trim_end_matches(".rs").to_owned());
            }
        }
        let source = |m: &str| match dir.join(format!("{m}.rs")) {
            file if file.exists() => read(file),
            _ => read(dir.join(m).join("mod.rs")),
        };
        let root = read(dir.join("mod.rs"));
        let mut reexported = BTreeMap::new();
        for at in ["pub use ", "pub(crate) use "] {
            for (i, _) in root.match_indices(at) {
                let rest = &root[i + at.len()..];
                let module = ident(rest);
                let Some(path) = rest[module.len()..].strip_prefix("::") else {
                    continue;
                };
                let names: Vec<String> = match path.strip_prefix('{') {
                    Some(list) => entries(list).iter().map(|e| last_name(e)).collect(),
                    None if path.starts_with('*') => {
                        defined(&source(&module)).into_iter().collect()
                    }
                    None => vec![last_name(path.split(';').next().unwrap_or_default())],
                };
                reexported.extend(names.into_iter().map(|n| (n, module.clone())));
            }
        }
        Self {
            modules,
            reexported,
            own: defined(&root),
        }
    }

    /// The module `name` (written `crate::<layer>::<name>`) is or comes from: `Ok(None)`
    /// for the root's own; `Err` for a name the layer has not.
    fn module_of(&self, name: &str) -> Result<Option<&str>, ()> {
        if let Some(m) = self.modules.get(name).or_else(|| self.reexported.get(name)) {
            return Ok(Some(m));
        }
        self.own.contains(name).then_some(None).ok_or(())
    }
}

/// The name a `use` entry makes: `C` of `b::B as C`, `B` of `b::B`.
fn last_name(entry: &str) -> String {
    let entry = entry.rsplit(" as ").next().unwrap_or(entry);
    ident(entry.rsplit("::").next().unwrap_or(entry))
}

/// Which modules of its own layer each module of `src` imports (`layer::module` names),
/// read from `crate::<layer>::` paths and the `super::` paths that reach the layer; and
/// the paths naming nothing the layer has, which the check cannot follow. A layer's root
/// (`mod.rs`) wires its modules and is no node: its own items are imported from nowhere.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_graph(src: &Path) -> (Graph, Vec<String>) {
    let mut layers: BTreeMap<String, Layer> = BTreeMap::new();
    let (mut graph, mut unknown) = (Graph::new(), Vec::new());
    for Source { path, parts, code } in layered_sources(src) {
        let (layer, module) = (parts[0].as_str(), parts[1].trim_end_matches(".rs"));
        if module == "mod" {
            continue;
        }
        let facts =
            (layers.entry(layer.to_owned())).or_insert_with(|| Layer::read(&src.join(layer)));
        // `super::` from `layer/m.rs` or `layer/m/mod.rs` is the layer; from
        // `layer/m/sub.rs` it is `m` itself, and `super::super::` the layer.
        let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod.rs"));
        let up = "super::".repeat(depth - 1);
        let own = format!("{layer}::{module}");
        let imports = graph.entry(own.clone()).or_default();
        let named = named_after(&code, &format!("crate::{layer}::")).into_iter();
        for (_, name) in named.chain(named_after(&code, &up)) {
            match facts.module_of(&name) {
                Ok(Some(m)) => {
                    imports.insert(format!("{layer}::{m}"));
                }
                Ok(None) => {}
                Err(()) => unknown.push(format!("{}: {layer}::{name}", path.display())),
            }
        }
        imports.remove(&own);
    }
    (graph, unknown)
}

/// A cycle in `graph` (the first module repeated last), if there is one: modules that
/// import each other cannot be read or changed apart.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    // Depth first, keeping the path: an import of a module on the path closes a cycle.
    fn visit(
        node: &str,
        graph: &Graph,
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
    (graph.keys()).find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn each_layer_imports_only_from_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}

/// The check itself can fail: imports upwards in a scratch tree are found, one written
/// as a path and one inside a `crate::{…}` list; a comment and the tests are not read.
#[test]
fn an_upward_import_is_found() {
    let scratch = std::env::temp_dir().join(format!("latchkey-layers-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("store")).unwrap();
    std::fs::write(
        scratch.join("store/mod.rs"),
        "use crate::base::clock;\nuse crate::dataplane::Shared;\n\
         // crate::cli in a comment\n\
         use crate::{\n    base::money,\n    serve::Run,\n};\n\
         #[cfg(test)]\nmod tests {\n    use crate::serve;\n}\n",
    )
    .unwrap();
    std::fs::create_dir_all(scratch.join("dataplane")).unwrap();
    std::fs::write(scratch.join("dataplane/mod.rs"), "use sqlx::Any;\n").unwrap();
    let mut found = violations(&scratch);
    std::fs::remove_dir_all(&scratch).unwrap();
    found.sort();
    let sep = std::path::MAIN_SEPARATOR;
    assert_eq!(
        found,
        [
            format!("dataplane{sep}mod.rs: the data plane uses sqlx"),
            format!("store{sep}mod.rs:2: store imports dataplane, above or beside it"),
            format!("store{sep}mod.rs:4: store imports serve, above or beside it"),
        ]
    );
}

#[test]
fn no_modules_of_a_layer_import_each_other_around() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (graph, unknown) = module_graph(&src);
    assert!(
        unknown.is_empty(),
        "paths the check cannot follow: {unknown:?}"
    );
    if let Some(found) = cycle(&graph) {
        panic!("modules import each other: {}", found.join(" -> "));
    }
}

/// The check itself can fail. In a scratch tree, two modules importing each other are
/// found: one from a file in its folder through nested `{…}` lists, the other naming an
/// item the root re-exports from it by a glob; and two through `super::`. With the
/// imports back made one way, nothing is; a path naming nothing is reported.
#[test]
fn a_cycle_of_imports_is_found() {
    let scratch = std::env::temp_dir().join(format!("latchkey-cycle-{}", std::process::id()));
    let tree = |facts: &str, b: &str| {
        let _ = std::fs::remove_dir_all(&scratch);
        let write = |path: &str, text: &str| {
            let path = scratch.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write(
            "dataplane/mod.rs",
            "pub mod facts;\npub mod rules;\npub use rules::*;\n",
        );
        write("dataplane/rules.rs", "mod reads;\npub struct Reads;\n");
        write(
            "dataplane/rules/reads.rs",
            "use crate::dataplane::{\n    names::{A, B},\n    facts::Recorded,\n};\n",
        );
        write("dataplane/facts.rs", facts);
        write(
            "dataplane/names.rs",
            "// crate::dataplane::rules in a comment\n",
        );
        write("cli/mod.rs", "mod a;\nmod b;\npub fn connect() {}\n");
        write("cli/a.rs", "use super::{b::Output, connect};\n");
        write("cli/b.rs", b);
        let found = module_graph(&scratch);
        (cycle(&found.0), found.1)
    };
    let both = tree("fn f(_: crate::dataplane::Reads) {}\n", "use super::a;\n");
    let dataplane = tree(
        "fn f(_: crate::dataplane::Reads) {}\n",
        "pub struct Output;\n",
    );
    let cli = tree("use super::names;\n", "use super::a;\n");
    let none = tree("use super::names;\n", "pub struct Output;\n");
    let unknown = tree("use crate::dataplane::nowhere;\n", "pub struct Output;\n");
    std::fs::remove_dir_all(&scratch).unwrap();
    let path = |p: &[&str]| Some(p.iter().map(|n| n.to_string()).collect::<Vec<_>>());
    assert_eq!(both.0, path(&["cli::a", "cli::b", "cli::a"]));
    assert_eq!(
        dataplane.0,
        path(&["dataplane::facts", "dataplane::rules", "dataplane::facts"])
    );
    assert_eq!(cli.0, path(&["cli::a", "cli::b", "cli::a"]));
    assert_eq!(none, (None, vec![]));
    assert_eq!(
        unknown.1,
        vec![format!(
            "dataplane{}facts.rs: dataplane::nowhere",
            std::path::MAIN_SEPARATOR
        )]
    );
}
