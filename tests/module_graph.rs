//! The library's modules import each other without circles: every `crate::`
//! and `super::` path in `src/` is an edge from the module that writes it to
//! the module it names (a facade's `pub use` counts as an edge too), and the
//! graph has no cycle. A cycle fails with the modules that form it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/gpu/batchnorm/forward.rs` -> `gpu::batchnorm::forward`; `lib.rs` -> `crate`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    if parts.first().map(String::as_str) == Some("bin") {
        return String::new();
    }
    if parts.is_empty() {
        "crate".into()
    } else {
        format!("crate::{}", parts.join("::"))
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The path segments after a `crate::` or `super::` at the start of `rest`,
/// with each item of a `{...}` group as its own path.
fn paths_at(rest: &str) -> Vec<Vec<String>> {
    let mut segs = Vec::new();
    let mut s = rest;
    loop {
        let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
        if end == 0 {
            break;
        }
        segs.push(s[..end].to_string());
        s = &s[end..];
        if let Some(next) = s.strip_prefix("::") {
            s = next;
        } else {
            break;
        }
    }
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 1;
        let mut item = String::new();
        let mut out = Vec::new();
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 || (depth == 1 && c == ',') {
                let first: String = item.trim().chars().take_while(|&c| is_ident(c)).collect();
                if !first.is_empty() {
                    let mut p = segs.clone();
                    p.push(first);
                    out.push(p);
                }
                item.clear();
                if depth == 0 {
                    break;
                }
            } else {
                item.push(c);
            }
        }
        return out;
    }
    vec![segs]
}

#[test]
fn modules_import_each_other_without_circles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        if from.is_empty() {
            continue; // a binary, not a library module
        }
        let text = std::fs::read_to_string(file).unwrap();
        // Inline `#[cfg(test)] mod tests` blocks close the files; their
        // `super::` is the file's own module, and tests may use anything.
        let code = text.split("\n#[cfg(test)]\nmod ").next().unwrap_or("");
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            // `use child::Item;` (a facade re-exporting its child, say) names
            // the child module by a relative path.
            let code = line.trim_start();
            let code = code.strip_prefix("pub ").unwrap_or(code);
            let code = code.strip_prefix("pub(crate) ").unwrap_or(code);
            if let Some(path) = code.strip_prefix("use ") {
                let first: String = path.chars().take_while(|&c| is_ident(c)).collect();
                let child = format!("{from}::{first}");
                if modules.contains(&child) {
                    edges.entry(from.clone()).or_default().insert(child);
                }
            }
            for (at, _) in line
                .match_indices("crate::")
                .chain(line.match_indices("super::"))
            {
                if at > 0 && line[..at].ends_with(|c: char| is_ident(c) || c == ':') {
                    continue; // the tail of a longer path (`super::super::`, `wgpu_batchnorm::`)
                }
                let mut base: Vec<&str> = if line[at..].starts_with("crate::") {
                    vec!["crate"]
                } else {
                    from.split("::").collect()
                };
                let mut rest = &line[at..];
                rest = rest.strip_prefix("crate::").unwrap_or(rest);
                while let Some(r) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = r;
                }
                for segs in paths_at(rest) {
                    // The longest prefix that is a module is the one named.
                    let mut target = base.join("::");
                    for s in &segs {
                        let longer = format!("{target}::{s}");
                        if !modules.contains(&longer) {
                            break;
                        }
                        target = longer;
                    }
                    if target != from && modules.contains(&target) {
                        edges.entry(from.clone()).or_default().insert(target);
                    }
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in &modules {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0
            && let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new())
        {
            panic!(
                "modules import each other in a circle: {}",
                cycle.join(" -> ")
            );
        }
    }
    // The check sees real imports: the GPU layer uses the context, and the
    // facades their children.
    assert!(edges["crate::gpu::tensor"].contains("crate::gpu::context"));
    assert!(edges["crate::gpu"].contains("crate::gpu::batchnorm"));
    assert!(edges["crate"].contains("crate::gpu"));
}
