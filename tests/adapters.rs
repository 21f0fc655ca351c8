//! The adapters the test environment promises are really there.
//!
//! `.ci/run` sets `BNORM_EXPECT_BACKENDS=vulkan,gl`, so CI fails (instead of
//! quietly testing fewer backends) when either software adapter goes missing.

mod common;

#[test]
fn expected_backends_are_present() {
    let contexts = common::gpu_contexts();
    for ctx in contexts {
        eprintln!("GPU backend under test: {}", ctx.label());
    }
    let Ok(expected) = std::env::var("BNORM_EXPECT_BACKENDS") else {
        return;
    };
    for want in expected.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let backend = wgpu_batchnorm::gpu::parse_backend(want)
            .unwrap_or_else(|| panic!("BNORM_EXPECT_BACKENDS names unknown backend {want:?}"));
        assert!(
            contexts.iter().any(|c| c.adapter_info().backend == backend),
            "expected a {want} adapter; found {:?}",
            contexts.iter().map(|c| c.label()).collect::<Vec<_>>()
        );
    }
}
