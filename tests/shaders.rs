//! Every embedded shader parses and validates with naga, so a broken shader
//! fails `cargo test` with its file and line instead of at the first dispatch.

use wgpu_batchnorm::shaders;

#[test]
fn every_shader_parses_and_validates() {
    let mut failures = Vec::new();
    for shader in shaders::ALL {
        let module = match naga::front::wgsl::parse_str(shader.source) {
            Ok(m) => m,
            Err(e) => {
                let line = e
                    .location(shader.source)
                    .map_or(0, |l| l.line_number as usize);
                let prefix = shader.prefix_lines();
                let (file, line) = if line > prefix {
                    (format!("shaders/{}.wgsl", shader.stem), line - prefix)
                } else {
                    (format!("prelude and shared parts of {}", shader.name), line)
                };
                failures.push(format!(
                    "{file}:{line}: {}",
                    e.emit_to_string(shader.source)
                ));
                continue;
            }
        };
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        if let Err(e) = validator.validate(&module) {
            failures.push(format!(
                "{} (shaders/{}.wgsl): {}",
                shader.name,
                shader.stem,
                e.emit_to_string(shader.source)
            ));
            continue;
        }
        let entry: Vec<_> = module
            .entry_points
            .iter()
            .map(|e| (e.name.as_str(), e.stage))
            .collect();
        if entry != [("main", naga::ShaderStage::Compute)] {
            failures.push(format!(
                "shaders/{}.wgsl: expected one compute entry point `main`, found {entry:?}",
                shader.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shader_file_is_embedded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let on_disk = std::fs::read_to_string(&path).unwrap();
        if let Some((_, part)) = shaders::PARTS.iter().find(|(name, _)| *name == stem) {
            // a shared part: embedded as it is on disk, and used by some shader
            assert_eq!(
                *part, on_disk,
                "{stem}: embedded text differs from the file"
            );
            assert!(
                shaders::ALL.iter().any(|s| s.source.contains(&on_disk)),
                "{stem} is in no shader"
            );
            continue;
        }
        let embedded = shaders::ALL.iter().find(|s| s.name == stem);
        let embedded =
            embedded.unwrap_or_else(|| panic!("{} is not in shaders::ALL", path.display()));
        assert_eq!(
            embedded.file, on_disk,
            "{stem}: embedded text differs from the file"
        );
        assert!(embedded.source.ends_with(&on_disk));
        assert!(embedded.source.contains(shaders::COMMON));
        assert!(embedded.source.contains(shaders::CONSTANTS));
        assert!(embedded.source.starts_with(shaders::PRELUDE_F32));
        // the f16 variant, where one exists, is the same file behind the f16 prelude
        if let Some(f16) = shaders::ALL
            .iter()
            .find(|s| s.name == format!("{stem}_f16"))
        {
            assert_eq!(f16.file, on_disk);
            assert!(f16.source.starts_with(shaders::PRELUDE_F16));
        }
    }
}

/// Every shader, variants included, ends with the text of the file it names.
#[test]
fn every_variant_is_its_file_after_its_parts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for shader in shaders::ALL {
        let path = dir.join(format!("{}.wgsl", shader.stem));
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {}: {e}", shader.name, path.display()));
        assert_eq!(shader.file, on_disk, "{}", shader.name);
        assert!(shader.source.ends_with(&on_disk), "{}", shader.name);
        assert!(
            shader.name.starts_with(shader.stem),
            "{} is named after {}",
            shader.name,
            shader.stem
        );
    }
    // the backward passes read dy through one of the upstream parts: the
    // plain one, or the fused backward's in its variants of the same files
    let part = |name: &str| shaders::PARTS.iter().find(|(n, _)| *n == name).unwrap().1;
    let upstream = ["upstream", "upstream_gated", "upstream_in_place"].map(part);
    let mut variants = 0;
    for s in shaders::ALL {
        let uses = upstream.map(|u| s.source.contains(u));
        let backward = s.stem.starts_with("backward_partial") || s.stem.starts_with("backward_dx");
        let want = match s.name {
            n if n.contains("_gated") => [false, true, false],
            n if n.contains("_in_place") => [false, false, true],
            _ => [backward, false, false],
        };
        assert_eq!(uses, want, "{}", s.name);
        if s.name.trim_end_matches("_f16") != s.stem {
            variants += 1;
        }
    }
    assert_eq!(
        variants, 8,
        "gated and in place, scalar and vec4, f32 and f16"
    );
}
