//! The WGSL sources, embedded at compile time.
//!
//! Each file under `shaders/` holds one compute entry point, `main`; the
//! shared `Params` struct and helpers in `shaders/common.wgsl` are prepended
//! to every one of them, after a storage prelude that makes the element type
//! of the big tensors f32 or f16: the kernels that touch those tensors exist
//! in both variants from the same file.

/// A compute shader: its file name (without `.wgsl`) and full source text.
#[derive(Debug, Clone, Copy)]
pub struct Shader {
    /// File name under `shaders/`, without extension; also the pipeline label suffix.
    pub name: &'static str,
    /// Storage prelude ([`PRELUDE_F32`] or [`PRELUDE_F16`]), `common.wgsl`, then the file's text.
    pub source: &'static str,
    /// The file's own text.
    pub file: &'static str,
}

impl Shader {
    /// Lines before the file's own text in [`Shader::source`] (prelude and `common.wgsl`),
    /// to map a line number in the source back to the file.
    pub fn prefix_lines(&self) -> usize {
        self.source[..self.source.len() - self.file.len()]
            .lines()
            .count()
    }
}

/// The shared prefix, `shaders/common.wgsl`.
pub const COMMON: &str = include_str!("../shaders/common.wgsl");

/// Element type of the big tensors for f32 storage.
pub const PRELUDE_F32: &str = "alias Elem = f32;\nalias Elem4 = vec4<f32>;\n";
/// Element type of the big tensors for f16 storage (needs `wgpu::Features::SHADER_F16`).
pub const PRELUDE_F16: &str = "enable f16;\nalias Elem = f16;\nalias Elem4 = vec4<f16>;\n";

macro_rules! shader {
    ($name:literal) => {
        Shader {
            name: $name,
            source: concat!(
                "alias Elem = f32;\nalias Elem4 = vec4<f32>;\n",
                include_str!("../shaders/common.wgsl"),
                include_str!(concat!("../shaders/", $name, ".wgsl"))
            ),
            file: include_str!(concat!("../shaders/", $name, ".wgsl")),
        }
    };
    ($name:literal, f16) => {
        Shader {
            name: concat!($name, "_f16"),
            source: concat!(
                "enable f16;\nalias Elem = f16;\nalias Elem4 = vec4<f16>;\n",
                include_str!("../shaders/common.wgsl"),
                include_str!(concat!("../shaders/", $name, ".wgsl"))
            ),
            file: include_str!(concat!("../shaders/", $name, ".wgsl")),
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

/// Training statistics, stage 1, f16 storage.
pub const STATS_PARTIAL_F16: Shader = shader!("stats_partial", f16);
/// Elementwise normalize, scalar, f16 storage.
pub const NORMALIZE_F16: Shader = shader!("normalize", f16);
/// Elementwise normalize, vec4, f16 storage.
pub const NORMALIZE_VEC4_F16: Shader = shader!("normalize_vec4", f16);
/// Backward stage 1, f16 storage.
pub const BACKWARD_PARTIAL_F16: Shader = shader!("backward_partial", f16);
/// Backward stage 3, scalar, f16 storage.
pub const BACKWARD_DX_F16: Shader = shader!("backward_dx", f16);
/// Backward stage 3, vec4, f16 storage.
pub const BACKWARD_DX_VEC4_F16: Shader = shader!("backward_dx_vec4", f16);

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
    STATS_PARTIAL_F16,
    NORMALIZE_F16,
    NORMALIZE_VEC4_F16,
    BACKWARD_PARTIAL_F16,
    BACKWARD_DX_F16,
    BACKWARD_DX_VEC4_F16,
];
