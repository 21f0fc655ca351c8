//! Every embedded shader parses and validates with naga, so a broken shader
//! fails `cargo test` with its file and line instead of at the first dispatch.

use wgpu_batchnorm::shaders::{self, Storage};

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
        // the f16 variants, where one exists, are the same file behind the
        // f16 preludes, both of them
        let variant = |storage: Storage| {
            let name = format!("{stem}{}", storage.suffix());
            shaders::ALL.iter().find(|s| s.name == name)
        };
        let f16 = [Storage::F16, Storage::F16Packed].map(variant);
        if shaders::NO_PACKED.contains(&stem.as_str()) {
            assert!(
                f16[0].is_some() && f16[1].is_none(),
                "{stem}: f16, not packed"
            );
        } else {
            assert_eq!(f16[0].is_some(), f16[1].is_some(), "{stem}");
        }
        for (s, storage) in f16.iter().zip([Storage::F16, Storage::F16Packed]) {
            if let Some(s) = s {
                assert_eq!(s.file, on_disk);
                assert!(s.source.starts_with(storage.prelude()), "{}", s.name);
                assert_eq!(
                    embedded.source.strip_prefix(shaders::PRELUDE_F32),
                    s.source.strip_prefix(storage.prelude()),
                    "{}: the same text after its prelude",
                    s.name
                );
            }
        }
    }
}

/// f16 tensors go to WGSL's `f16` only on devices with SHADER_F16.
#[test]
fn f16_is_packed_unless_the_device_has_shader_f16() {
    use wgpu::Features;
    assert_eq!(Storage::f16_on(Features::SHADER_F16), Storage::F16);
    let others = Features::TIMESTAMP_QUERY | Features::SUBGROUP;
    assert_eq!(Storage::f16_on(others), Storage::F16Packed);
    assert_eq!(Storage::f16_on(Features::empty()), Storage::F16Packed);
}

/// The storage type of a shader, from its name's suffix.
fn storage_of(s: &shaders::Shader) -> Storage {
    [Storage::F16Packed, Storage::F16]
        .into_iter()
        .find(|st| s.name.ends_with(st.suffix()))
        .unwrap_or(Storage::F32)
}

/// The packed f16 variants are for devices without SHADER_F16: like the f32
/// ones they validate without naga's SHADER_FLOAT16 capability, which the
/// `_f16` ones need; they need only SHADER_FLOAT16_IN_FLOAT32
/// (`pack2x16float`, `unpack2x16float`: wgpu's `SHADER_F16_IN_F32`
/// downlevel flag), which the f32 ones do without.
#[test]
fn only_the_native_f16_variants_need_shader_f16() {
    use naga::valid::Capabilities as Caps;
    let validates = |shader: &shaders::Shader, caps: Caps| {
        let module = naga::front::wgsl::parse_str(shader.source).expect("parses");
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .map(|_| ())
            .map_err(|e| e.emit_to_string(shader.source))
    };
    let mut packed = 0;
    for shader in shaders::ALL {
        let name = shader.name;
        // the subgroup merges need naga's SUBGROUP (wgpu's SUBGROUP), the others nothing
        let base = if shaders::SUBGROUP.iter().any(|n| name.starts_with(n)) {
            let without = Caps::all().difference(Caps::SUBGROUP);
            assert!(
                validates(shader, without).is_err(),
                "{name} validated without subgroups"
            );
            Caps::SUBGROUP
        } else {
            Caps::empty()
        };
        let (core, in_f32) = (
            validates(shader, base),
            validates(shader, base | Caps::SHADER_FLOAT16_IN_FLOAT32),
        );
        match storage_of(shader) {
            Storage::F32 => core.unwrap_or_else(|e| panic!("{name}: {e}")),
            Storage::F16 => assert!(in_f32.is_err(), "{name} validated without f16"),
            Storage::F16Packed => {
                in_f32.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(core.is_err(), "{name} validated without pack2x16float");
                packed += 1;
            }
        }
    }
    assert_eq!(
        packed, 16,
        "every element kernel, fused and subgroup variant, packed, but NO_PACKED's"
    );
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
        // the single passes merge through one of two parts
        let merges = ["single_merge", "single_merge_subgroup"].map(part);
        let uses = merges.map(|m| s.source.contains(m));
        let want = match s.name {
            n if n.contains("_subgroup") => [false, true],
            _ if s.stem.contains("_single") => [true, false],
            _ => [false, false],
        };
        assert_eq!(uses, want, "{}", s.name);
        if s.name.strip_suffix(storage_of(s).suffix()) != Some(s.stem) {
            variants += 1;
        }
    }
    assert_eq!(
        variants, 20,
        "gated and in place, scalar and vec4, f32, f16 and packed f16; the single \
         passes merging in subgroups, f32, f16 and (vec4 items) packed f16"
    );
}
