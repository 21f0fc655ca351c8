//! The WGSL sources, embedded at compile time.
//!
//! Each file under `shaders/` holds one compute entry point, `main`, except
//! the shared parts `common.wgsl` (every shader), `reduce.wgsl` (the
//! reduction passes: their grid, Welford lanes and workgroup merges),
//! `stats_io.wgsl` (the bindings of the statistics passes) and
//! `upstream.wgsl`, `upstream_gated.wgsl` and `upstream_in_place.wgsl` (how
//! the backward passes read `dy`: as it is; gated by the fused output and
//! written out, in the reductions' `_gated` variants; read back from `dx`,
//! in the dx pass's `_in_place` variants; a variant is the same file after
//! another part). Before
//! its text come a storage prelude that makes the element type of the big
//! tensors f32 or f16 (the kernels that touch those tensors exist in both
//! variants from the same file), the constants of [`CONSTANTS`] (workgroup
//! sizes and flag bits, defined once here for Rust and WGSL alike), and the
//! shared `Params` struct and helpers of `shaders/common.wgsl`, then the
//! shared parts it uses.

/// A compute shader: its name, its file and full source text.
#[derive(Debug, Clone, Copy)]
pub struct Shader {
    /// File name under `shaders/`, without extension, then the variant's
    /// suffix (`_gated`, `_in_place`: the file after other parts) and `_f16`
    /// for f16 storage; also the pipeline label suffix.
    pub name: &'static str,
    /// Storage prelude ([`PRELUDE_F32`] or [`PRELUDE_F16`]), [`CONSTANTS`],
    /// `common.wgsl`, then the file's text.
    pub source: &'static str,
    /// The file's own text.
    pub file: &'static str,
    /// The file's name under `shaders/`, without extension.
    pub stem: &'static str,
}

impl Shader {
    /// Lines before the file's own text in [`Shader::source`] (prelude, constants and `common.wgsl`),
    /// to map a line number in the source back to the file.
    pub fn prefix_lines(&self) -> usize {
        self.source[..self.source.len() - self.file.len()]
            .lines()
            .count()
    }
}

// Each value below is written once, in a macro that expands to a literal, so
// that both the Rust constants and the WGSL text of every shader (through
// `concat!`) come from it.
macro_rules! wg {
    () => {
        256
    };
}
macro_rules! wg_channel {
    () => {
        64
    };
}
macro_rules! flag_update_running {
    () => {
        1
    };
}
macro_rules! flag_batch_stats {
    () => {
        2
    };
}
macro_rules! flag_cumulative {
    () => {
        4
    };
}
macro_rules! flag_lane_channels {
    () => {
        8
    };
}
macro_rules! flag_residual {
    () => {
        16
    };
}
macro_rules! flag_relu {
    () => {
        32
    };
}
macro_rules! prelude_f32 {
    () => {
        "alias Elem = f32;\nalias Elem4 = vec4<f32>;\n"
    };
}
macro_rules! prelude_f16 {
    () => {
        "enable f16;\nalias Elem = f16;\nalias Elem4 = vec4<f16>;\n"
    };
}
macro_rules! constants {
    () => {
        concat!(
            "const WG: u32 = ",
            wg!(),
            "u;\nconst WG_CHANNEL: u32 = ",
            wg_channel!(),
            "u;\nconst FLAG_UPDATE_RUNNING: u32 = ",
            flag_update_running!(),
            "u;\nconst FLAG_BATCH_STATS: u32 = ",
            flag_batch_stats!(),
            "u;\nconst FLAG_CUMULATIVE: u32 = ",
            flag_cumulative!(),
            "u;\nconst FLAG_LANE_CHANNELS: u32 = ",
            flag_lane_channels!(),
            "u;\nconst FLAG_RESIDUAL: u32 = ",
            flag_residual!(),
            "u;\nconst FLAG_RELU: u32 = ",
            flag_relu!(),
            "u;\n"
        )
    };
}

/// Threads per workgroup of the kernels that walk the big tensors (`WG` in the shaders).
pub const WG: u32 = wg!();
/// Threads per workgroup of the per-channel kernels (`WG_CHANNEL` in the shaders).
pub const WG_CHANNEL: u32 = wg_channel!();
/// `Params::flags` bit: the training forward moves the running statistics.
pub const FLAG_UPDATE_RUNNING: u32 = flag_update_running!();
/// `Params::flags` bit: the backward uses batch statistics.
pub const FLAG_BATCH_STATS: u32 = flag_batch_stats!();
/// `Params::flags` bit: `momentum = None`, the running statistics are the
/// cumulative average (factor `1 / num_batches_tracked`, read on the device).
pub const FLAG_CUMULATIVE: u32 = flag_cumulative!();
/// `Params::flags` bit: the lanes of a reduction's vec4 items are four
/// adjacent channels (channels-last), not four values of one channel.
pub const FLAG_LANE_CHANNELS: u32 = flag_lane_channels!();
/// `Params::flags` bit: the normalize pass adds the residual `z` (fused forward).
pub const FLAG_RESIDUAL: u32 = flag_residual!();
/// `Params::flags` bit: the normalize pass applies the ReLU (fused forward);
/// the gated backward reduction stops `dy` where the fused output `y <= 0`.
pub const FLAG_RELU: u32 = flag_relu!();

/// The shared prefix, `shaders/common.wgsl`.
pub const COMMON: &str = include_str!("../shaders/common.wgsl");

/// The shared parts of the shaders, by file name (without `.wgsl`):
/// `common` before every shader, `reduce` before the reduction passes,
/// `stats_io` before the statistics passes, `upstream` (plain),
/// `upstream_gated` (the reductions' gated variants) or `upstream_in_place`
/// (the dx pass's in-place variants) before the backward passes: how they
/// read `dy`.
pub const PARTS: &[(&str, &str)] = &[
    ("common", COMMON),
    ("reduce", include_str!("../shaders/reduce.wgsl")),
    ("stats_io", include_str!("../shaders/stats_io.wgsl")),
    ("upstream", include_str!("../shaders/upstream.wgsl")),
    (
        "upstream_gated",
        include_str!("../shaders/upstream_gated.wgsl"),
    ),
    (
        "upstream_in_place",
        include_str!("../shaders/upstream_in_place.wgsl"),
    ),
];

/// Element type of the big tensors for f32 storage.
pub const PRELUDE_F32: &str = prelude_f32!();
/// Element type of the big tensors for f16 storage (needs `wgpu::Features::SHADER_F16`).
pub const PRELUDE_F16: &str = prelude_f16!();
/// The workgroup sizes and flag bits above, as WGSL constants; every shader
/// has them after its storage prelude.
pub const CONSTANTS: &str = constants!();

// `shader!("file", uses "part", ...)`; `, f16` after the file for the f16
// variant; `"file" as "label"` for a variant of a file with other parts.
macro_rules! shader {
    ($name:literal $(, uses $inc:literal)*) => {
        shader!(@ $name, $name, prelude_f32!(); $($inc),*)
    };
    ($name:literal, f16 $(, uses $inc:literal)*) => {
        shader!(@ concat!($name, "_f16"), $name, prelude_f16!(); $($inc),*)
    };
    ($name:literal as $label:literal $(, uses $inc:literal)*) => {
        shader!(@ $label, $name, prelude_f32!(); $($inc),*)
    };
    ($name:literal as $label:literal, f16 $(, uses $inc:literal)*) => {
        shader!(@ concat!($label, "_f16"), $name, prelude_f16!(); $($inc),*)
    };
    (@ $label:expr, $name:literal, $prelude:expr; $($inc:literal),*) => {
        Shader {
            name: $label,
            source: concat!(
                $prelude,
                constants!(),
                include_str!("../shaders/common.wgsl"),
                $(include_str!(concat!("../shaders/", $inc, ".wgsl")),)*
                include_str!(concat!("../shaders/", $name, ".wgsl"))
            ),
            file: include_str!(concat!("../shaders/", $name, ".wgsl")),
            stem: $name,
        }
    };
}

/// Training statistics, stage 1 (Welford per channel slice).
pub const STATS_PARTIAL: Shader = shader!("stats_partial", uses "reduce", uses "stats_io");
/// Training statistics, stage 1, vec4 items.
pub const STATS_PARTIAL_VEC4: Shader =
    shader!("stats_partial_vec4", uses "reduce", uses "stats_io");
/// Training statistics, stage 2 (Chan merge, running statistics, coefficients).
pub const STATS_FINALIZE: Shader = shader!("stats_finalize");
/// Evaluation coefficients from the running statistics.
pub const EVAL_COEFFS: Shader = shader!("eval_coeffs");
/// Elementwise normalize, scalar.
pub const NORMALIZE: Shader = shader!("normalize");
/// Elementwise normalize, vec4.
pub const NORMALIZE_VEC4: Shader = shader!("normalize_vec4");
/// Backward stage 1 (partial S1, S2).
pub const BACKWARD_PARTIAL: Shader = shader!("backward_partial", uses "reduce", uses "upstream");
/// Backward stage 1, vec4 items.
pub const BACKWARD_PARTIAL_VEC4: Shader =
    shader!("backward_partial_vec4", uses "reduce", uses "upstream");
/// Backward stage 1 of a fused backward: the sums of the gated `dy`, which
/// it also writes out (six storage buffers: built where the device has them).
pub const BACKWARD_PARTIAL_GATED: Shader =
    shader!("backward_partial" as "backward_partial_gated", uses "reduce", uses "upstream_gated");
/// Backward stage 1 of a fused backward, vec4 items.
pub const BACKWARD_PARTIAL_VEC4_GATED: Shader = shader!(
    "backward_partial_vec4" as "backward_partial_vec4_gated",
    uses "reduce",
    uses "upstream_gated"
);
/// Backward stage 2 (dweight, dbias, dx coefficients).
pub const BACKWARD_FINALIZE: Shader = shader!("backward_finalize");
/// Backward stage 3, scalar.
pub const BACKWARD_DX: Shader = shader!("backward_dx", uses "upstream");
/// Backward stage 3, vec4.
pub const BACKWARD_DX_VEC4: Shader = shader!("backward_dx_vec4", uses "upstream");
/// Backward stage 3 of a fused backward without a residual: the gated `dy`
/// read back from `dx`, where the gated reduction left it.
pub const BACKWARD_DX_IN_PLACE: Shader =
    shader!("backward_dx" as "backward_dx_in_place", uses "upstream_in_place");
/// Backward stage 3 of a fused backward without a residual, vec4.
pub const BACKWARD_DX_VEC4_IN_PLACE: Shader = shader!(
    "backward_dx_vec4" as "backward_dx_vec4_in_place",
    uses "upstream_in_place"
);

/// Bandwidth roofline: vec4 copy (`GpuContext::copy`, `bnorm bench`).
pub const COPY_VEC4: Shader = shader!("copy_vec4");

/// Training statistics, stage 1, f16 storage.
pub const STATS_PARTIAL_F16: Shader = shader!("stats_partial", f16, uses "reduce", uses "stats_io");
/// Training statistics, stage 1, vec4 items, f16 storage.
pub const STATS_PARTIAL_VEC4_F16: Shader =
    shader!("stats_partial_vec4", f16, uses "reduce", uses "stats_io");
/// Elementwise normalize, scalar, f16 storage.
pub const NORMALIZE_F16: Shader = shader!("normalize", f16);
/// Elementwise normalize, vec4, f16 storage.
pub const NORMALIZE_VEC4_F16: Shader = shader!("normalize_vec4", f16);
/// Backward stage 1, f16 storage.
pub const BACKWARD_PARTIAL_F16: Shader =
    shader!("backward_partial", f16, uses "reduce", uses "upstream");
/// Backward stage 1, vec4 items, f16 storage.
pub const BACKWARD_PARTIAL_VEC4_F16: Shader =
    shader!("backward_partial_vec4", f16, uses "reduce", uses "upstream");
/// Backward stage 1 of a fused backward, f16 storage.
pub const BACKWARD_PARTIAL_GATED_F16: Shader = shader!(
    "backward_partial" as "backward_partial_gated",
    f16,
    uses "reduce",
    uses "upstream_gated"
);
/// Backward stage 1 of a fused backward, vec4 items, f16 storage.
pub const BACKWARD_PARTIAL_VEC4_GATED_F16: Shader = shader!(
    "backward_partial_vec4" as "backward_partial_vec4_gated",
    f16,
    uses "reduce",
    uses "upstream_gated"
);
/// Backward stage 3, scalar, f16 storage.
pub const BACKWARD_DX_F16: Shader = shader!("backward_dx", f16, uses "upstream");
/// Backward stage 3, vec4, f16 storage.
pub const BACKWARD_DX_VEC4_F16: Shader = shader!("backward_dx_vec4", f16, uses "upstream");
/// Backward stage 3 of a fused backward without a residual, f16 storage.
pub const BACKWARD_DX_IN_PLACE_F16: Shader = shader!(
    "backward_dx" as "backward_dx_in_place",
    f16,
    uses "upstream_in_place"
);
/// Backward stage 3 of a fused backward without a residual, vec4, f16 storage.
pub const BACKWARD_DX_VEC4_IN_PLACE_F16: Shader = shader!(
    "backward_dx_vec4" as "backward_dx_vec4_in_place",
    f16,
    uses "upstream_in_place"
);

/// Every shader of the crate.
pub const ALL: &[Shader] = &[
    STATS_PARTIAL,
    STATS_PARTIAL_VEC4,
    STATS_FINALIZE,
    EVAL_COEFFS,
    NORMALIZE,
    NORMALIZE_VEC4,
    BACKWARD_PARTIAL,
    BACKWARD_PARTIAL_VEC4,
    BACKWARD_PARTIAL_GATED,
    BACKWARD_PARTIAL_VEC4_GATED,
    BACKWARD_FINALIZE,
    BACKWARD_DX,
    BACKWARD_DX_VEC4,
    BACKWARD_DX_IN_PLACE,
    BACKWARD_DX_VEC4_IN_PLACE,
    COPY_VEC4,
    STATS_PARTIAL_F16,
    STATS_PARTIAL_VEC4_F16,
    NORMALIZE_F16,
    NORMALIZE_VEC4_F16,
    BACKWARD_PARTIAL_F16,
    BACKWARD_PARTIAL_VEC4_F16,
    BACKWARD_PARTIAL_GATED_F16,
    BACKWARD_PARTIAL_VEC4_GATED_F16,
    BACKWARD_DX_F16,
    BACKWARD_DX_VEC4_F16,
    BACKWARD_DX_IN_PLACE_F16,
    BACKWARD_DX_VEC4_IN_PLACE_F16,
];
