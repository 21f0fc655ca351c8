//! The WGSL sources, embedded at compile time.
//!
//! Each file under `shaders/` holds one compute entry point, `main`; the
//! shared `Params` struct and helpers in `shaders/common.wgsl` are prepended
//! to every one of them.

/// A compute shader: its file name (without `.wgsl`) and full source text.
#[derive(Debug, Clone, Copy)]
pub struct Shader {
    /// File name under `shaders/`, without extension; also the pipeline label suffix.
    pub name: &'static str,
    /// `common.wgsl` followed by the file's text.
    pub source: &'static str,
}

/// The shared prefix, `shaders/common.wgsl`.
pub const COMMON: &str = include_str!("../shaders/common.wgsl");

/// Lines of [`COMMON`], to map a line number in [`Shader::source`] back to the file.
pub fn common_lines() -> usize {
    COMMON.lines().count()
}

macro_rules! shader {
    ($name:literal) => {
        Shader {
            name: $name,
            source: concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!(concat!("../shaders/", $name, ".wgsl"))
            ),
        }
    };
}

/// Training statistics, stage 1 (Welford per channel slice).
pub const STATS_PARTIAL: Shader = shader!("stats_partial");
/// Training statistics, stage 2 (Chan merge, running statistics, coefficients).
pub const STATS_FINALIZE: Shader = shader!("stats_finalize");
/// Evaluation coefficients from the running statistics.
pub const EVAL_COEFFS: Shader = shader!("eval_coeffs");
/// Elementwise normalize, scalar.
pub const NORMALIZE: Shader = shader!("normalize");
/// Elementwise normalize, vec4.
pub const NORMALIZE_VEC4: Shader = shader!("normalize_vec4");
/// Backward stage 1 (partial S1, S2).
pub const BACKWARD_PARTIAL: Shader = shader!("backward_partial");
/// Backward stage 2 (dweight, dbias, dx coefficients).
pub const BACKWARD_FINALIZE: Shader = shader!("backward_finalize");
/// Backward stage 3, scalar.
pub const BACKWARD_DX: Shader = shader!("backward_dx");
/// Backward stage 3, vec4.
pub const BACKWARD_DX_VEC4: Shader = shader!("backward_dx_vec4");

/// Bandwidth roofline: vec4 copy (`GpuContext::copy`, `bnorm bench`).
pub const COPY_VEC4: Shader = shader!("copy_vec4");

/// Every shader of the crate.
pub const ALL: &[Shader] = &[
    STATS_PARTIAL,
    STATS_FINALIZE,
    EVAL_COEFFS,
    NORMALIZE,
    NORMALIZE_VEC4,
    BACKWARD_PARTIAL,
    BACKWARD_FINALIZE,
    BACKWARD_DX,
    BACKWARD_DX_VEC4,
    COPY_VEC4,
];
