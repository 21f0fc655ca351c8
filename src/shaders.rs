//! The WGSL sources, embedded at compile time.
//!
//! Each file under `shaders/` holds one compute entry point, `main`, except
//! the shared parts `common.wgsl` (every shader), `reduce.wgsl` (the
//! reduction passes: their grid, Welford lanes and workgroup merges),
//! `stats_io.wgsl` (the bindings of the statistics passes), `items.wgsl`
//! and `items_vec4.wgsl` (the item types of the backward passes, single
//! elements or vec4s) and `upstream.wgsl`, `upstream_gated.wgsl` and
//! `upstream_in_place.wgsl` (how the backward passes read `dy`: as it is;
//! gated by the fused output and written out, in the reductions' `_gated`
//! variants; read back from `dx`, in the dx pass's `_in_place` variants; a
//! variant is the same file after another part). Before its text come a
//! storage prelude ([`Storage`]) that makes the big tensors f32, f16 or
//! packed f16 (pairs of f16 in `u32` words, for devices without
//! `SHADER_F16`) and gives the conversions the kernels load and store them
//! with (the kernels that touch those tensors exist in the three variants
//! from the same file), the constants of [`CONSTANTS`] (workgroup sizes and
//! flag bits, defined once here for Rust and WGSL alike), and the shared
//! `Params` struct and helpers of `shaders/common.wgsl`, then the shared
//! parts it uses.

/// A compute shader: its name, its file and full source text.
#[derive(Debug, Clone, Copy)]
pub struct Shader {
    /// File name under `shaders/`, without extension, then the variant's
    /// suffix (`_gated`, `_in_place`: the file after other parts) and that
    /// of its storage ([`Storage::suffix`]); also the pipeline label suffix.
    pub name: &'static str,
    /// Storage prelude ([`Storage::prelude`]), [`CONSTANTS`],
    /// `common.wgsl`, the shared parts it uses, then the file's text.
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

#[macro_use]
mod literals;

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
/// read `dy`; `single` then `single_merge` (through workgroup memory) or
/// `single_merge_subgroup` (in subgroups: wgpu's `SUBGROUP` feature) before
/// the single passes.
pub const PARTS: &[(&str, &str)] = &[
    ("common", COMMON),
    ("items", include_str!("../shaders/items.wgsl")),
    ("items_vec4", include_str!("../shaders/items_vec4.wgsl")),
    ("special", include_str!("../shaders/special.wgsl")),
    ("reduce", include_str!("../shaders/reduce.wgsl")),
    ("counter", include_str!("../shaders/counter.wgsl")),
    ("finish", include_str!("../shaders/finish.wgsl")),
    ("single", include_str!("../shaders/single.wgsl")),
    ("single_merge", include_str!("../shaders/single_merge.wgsl")),
    (
        "single_merge_subgroup",
        include_str!("../shaders/single_merge_subgroup.wgsl"),
    ),
    ("single_vec4", include_str!("../shaders/single_vec4.wgsl")),
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

/// Element type of the big tensors for f32 storage, and the conversions the
/// kernels load and store it with (identities here).
pub const PRELUDE_F32: &str = prelude_f32!();
/// Element type of the big tensors for f16 storage with WGSL's `f16` (needs
/// `wgpu::Features::SHADER_F16`), and its conversions to and from f32.
pub const PRELUDE_F16: &str = prelude_f16!();
/// Element type of the big tensors for f16 storage in core WGSL, on devices
/// without `SHADER_F16`: the same bytes as [`PRELUDE_F16`]'s, read as `u32`
/// words of two f16 values (`Elem`; `Elem4`, a vec4, is two words) and
/// converted with `unpack2x16float` and `pack2x16float`.
pub const PRELUDE_F16_PACKED: &str = prelude_f16_packed!();

/// How the kernels that touch the big tensors hold their elements: the
/// storage prelude of a shader variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Storage {
    /// f32 ([`PRELUDE_F32`]).
    F32,
    /// f16 as WGSL's `f16` ([`PRELUDE_F16`], needs `SHADER_F16`).
    F16,
    /// f16 packed in pairs in `u32` words ([`PRELUDE_F16_PACKED`], core WGSL).
    F16Packed,
}

impl Storage {
    /// The storage prelude, which goes first in a shader's source.
    pub const fn prelude(self) -> &'static str {
        match self {
            Self::F32 => PRELUDE_F32,
            Self::F16 => PRELUDE_F16,
            Self::F16Packed => PRELUDE_F16_PACKED,
        }
    }

    /// The storage of f16 tensors on a device with `features`: WGSL's `f16`
    /// with `SHADER_F16`, else packed (the choice of this crate's kernels
    /// but on lavapipe, which runs the packed ones; the bytes are the same
    /// either way, so an app's own kernels on the same tensors may use
    /// either).
    pub fn f16_on(features: wgpu::Features) -> Self {
        if features.contains(wgpu::Features::SHADER_F16) {
            Self::F16
        } else {
            Self::F16Packed
        }
    }

    /// The suffix of the shader names of the variant (`""`, `"_f16"`, `"_f16_packed"`).
    pub const fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "",
            Self::F16 => "_f16",
            Self::F16Packed => "_f16_packed",
        }
    }

    /// The variant of a shader for this storage, from `[f32, f16, packed f16]`.
    pub(crate) fn pick<T: Copy>(self, variants: [T; 3]) -> T {
        match self {
            Self::F32 => variants[0],
            Self::F16 => variants[1],
            Self::F16Packed => variants[2],
        }
    }
}
/// The workgroup sizes and flag bits above, as WGSL constants; every shader
/// has them after its storage prelude.
pub const CONSTANTS: &str = constants!();

// `shader!("file", uses "part", ...)`; `"file" as "label"` for a variant of
// a file with other parts.
macro_rules! shader {
    ($name:literal $(, uses $inc:literal)*) => {
        shader!(@ $name, $name, prelude_f32!(); $($inc),*)
    };
    ($name:literal as $label:literal $(, uses $inc:literal)*) => {
        shader!(@ $label, $name, prelude_f32!(); $($inc),*)
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

// The label of `"file"` or `"file" as "label"`.
macro_rules! label {
    ($name:literal) => {
        $name
    };
    ($name:literal as $label:literal) => {
        $label
    };
}

// `variants!("doc", F32, F16, F16_PACKED = "file" [as "label"], uses "part", ...)`:
// the three storage variants of a shader that touches the big tensors, one
// file behind each prelude, named `label`, `label_f16`, `label_f16_packed`.
macro_rules! variants {
    ($doc:literal, $f32:ident, $f16:ident, $packed:ident = $name:literal $(as $label:literal)? $(, uses $inc:literal)*) => {
        #[doc = concat!($doc, ".")]
        pub const $f32: Shader =
            shader!(@ label!($name $(as $label)?), $name, prelude_f32!(); $($inc),*);
        #[doc = concat!($doc, ", f16 storage.")]
        pub const $f16: Shader = shader!(
            @ concat!(label!($name $(as $label)?), "_f16"), $name, prelude_f16!(); $($inc),*
        );
        #[doc = concat!($doc, ", packed f16 storage.")]
        pub const $packed: Shader = shader!(
            @ concat!(label!($name $(as $label)?), "_f16_packed"), $name, prelude_f16_packed!(); $($inc),*
        );
    };
}

variants!(
    "Training statistics, stage 1 (Welford per channel slice)",
    STATS_PARTIAL, STATS_PARTIAL_F16, STATS_PARTIAL_F16_PACKED =
    "stats_partial", uses "special", uses "reduce", uses "counter", uses "stats_io"
);
variants!(
    "Training statistics, stage 1, vec4 items",
    STATS_PARTIAL_VEC4, STATS_PARTIAL_VEC4_F16, STATS_PARTIAL_VEC4_F16_PACKED =
    "stats_partial_vec4", uses "special", uses "reduce", uses "counter", uses "stats_io"
);
variants!(
    "Elementwise normalize, scalar",
    NORMALIZE,
    NORMALIZE_F16,
    NORMALIZE_F16_PACKED = "normalize"
);
variants!(
    "Elementwise normalize, vec4",
    NORMALIZE_VEC4,
    NORMALIZE_VEC4_F16,
    NORMALIZE_VEC4_F16_PACKED = "normalize_vec4"
);
variants!(
    "Backward stage 1 (partial S1, S2)",
    BACKWARD_PARTIAL, BACKWARD_PARTIAL_F16, BACKWARD_PARTIAL_F16_PACKED =
    "backward_partial", uses "items", uses "special", uses "reduce", uses "upstream"
);
variants!(
    "Backward stage 1, vec4 items",
    BACKWARD_PARTIAL_VEC4, BACKWARD_PARTIAL_VEC4_F16, BACKWARD_PARTIAL_VEC4_F16_PACKED =
    "backward_partial_vec4", uses "items_vec4", uses "special", uses "reduce", uses "upstream"
);
variants!(
    "Backward stage 1 of a fused backward: the sums of the gated `dy`, which \
     it also writes out (six storage buffers: built where the device has them)",
    BACKWARD_PARTIAL_GATED, BACKWARD_PARTIAL_GATED_F16, BACKWARD_PARTIAL_GATED_F16_PACKED =
    "backward_partial" as "backward_partial_gated",
    uses "items", uses "special", uses "reduce", uses "upstream_gated"
);
variants!(
    "Backward stage 1 of a fused backward, vec4 items",
    BACKWARD_PARTIAL_VEC4_GATED, BACKWARD_PARTIAL_VEC4_GATED_F16,
    BACKWARD_PARTIAL_VEC4_GATED_F16_PACKED =
    "backward_partial_vec4" as "backward_partial_vec4_gated",
    uses "items_vec4", uses "special", uses "reduce", uses "upstream_gated"
);
variants!(
    "Backward stage 3, scalar",
    BACKWARD_DX, BACKWARD_DX_F16, BACKWARD_DX_F16_PACKED =
    "backward_dx", uses "items", uses "upstream"
);
variants!(
    "Backward stage 3, vec4",
    BACKWARD_DX_VEC4, BACKWARD_DX_VEC4_F16, BACKWARD_DX_VEC4_F16_PACKED =
    "backward_dx_vec4", uses "items_vec4", uses "upstream"
);
variants!(
    "Backward stage 3 of a fused backward without a residual: the gated `dy` \
     read back from `dx`, where the gated reduction left it",
    BACKWARD_DX_IN_PLACE, BACKWARD_DX_IN_PLACE_F16, BACKWARD_DX_IN_PLACE_F16_PACKED =
    "backward_dx" as "backward_dx_in_place", uses "items", uses "upstream_in_place"
);
variants!(
    "Backward stage 3 of a fused backward without a residual, vec4",
    BACKWARD_DX_VEC4_IN_PLACE, BACKWARD_DX_VEC4_IN_PLACE_F16,
    BACKWARD_DX_VEC4_IN_PLACE_F16_PACKED =
    "backward_dx_vec4" as "backward_dx_vec4_in_place",
    uses "items_vec4", uses "upstream_in_place"
);

variants!(
    "Single-pass training forward, vec4 items (statistics, running statistics \
     and y in one dispatch; pipelines per `ITEMS`, `T`, `K` override)",
    FORWARD_SINGLE, FORWARD_SINGLE_F16, FORWARD_SINGLE_F16_PACKED =
    "forward_single", uses "special", uses "counter", uses "finish", uses "single",
    uses "single_merge", uses "single_vec4"
);
variants!(
    "Single-pass backward with batch statistics, vec4 items (sums, dweight, \
     dbias and dx in one dispatch; pipelines per `ITEMS`, `T`, `K`, `FUSED` override)",
    BACKWARD_SINGLE, BACKWARD_SINGLE_F16, BACKWARD_SINGLE_F16_PACKED =
    "backward_single", uses "special", uses "counter", uses "finish", uses "single",
    uses "single_merge", uses "single_vec4"
);
variants!(
    "Single-pass training forward, vec4 items, merging in subgroups (`SG` \
     override; needs `SUBGROUP`)",
    FORWARD_SINGLE_SUBGROUP, FORWARD_SINGLE_SUBGROUP_F16, FORWARD_SINGLE_SUBGROUP_F16_PACKED =
    "forward_single" as "forward_single_subgroup", uses "special", uses "counter",
    uses "finish", uses "single", uses "single_merge_subgroup", uses "single_vec4"
);
variants!(
    "Single-pass backward, vec4 items, merging in subgroups (`SG` override; \
     needs `SUBGROUP`)",
    BACKWARD_SINGLE_SUBGROUP, BACKWARD_SINGLE_SUBGROUP_F16, BACKWARD_SINGLE_SUBGROUP_F16_PACKED =
    "backward_single" as "backward_single_subgroup", uses "special", uses "counter",
    uses "finish", uses "single", uses "single_merge_subgroup", uses "single_vec4"
);
/// Single-pass training forward, items of four single elements.
pub const FORWARD_SINGLE_SCALAR: Shader = shader!(
    "forward_single_scalar", uses "special", uses "counter", uses "finish", uses "single",
    uses "single_merge"
);
/// Single-pass training forward, items of four single elements, f16
/// storage. It writes single elements, so it has no packed variant
/// ([`NO_PACKED`]).
pub const FORWARD_SINGLE_SCALAR_F16: Shader = shader!(
    @ "forward_single_scalar_f16", "forward_single_scalar", prelude_f16!();
    "special", "counter", "finish", "single", "single_merge"
);
/// Single-pass training forward, items of four single elements, merging in
/// subgroups (`SG` override; needs `SUBGROUP`).
pub const FORWARD_SINGLE_SCALAR_SUBGROUP: Shader = shader!(
    "forward_single_scalar" as "forward_single_scalar_subgroup", uses "special",
    uses "counter", uses "finish", uses "single", uses "single_merge_subgroup"
);
/// Single-pass training forward, items of four single elements, merging in
/// subgroups, f16 storage (no packed variant: [`NO_PACKED`]).
pub const FORWARD_SINGLE_SCALAR_SUBGROUP_F16: Shader = shader!(
    @ "forward_single_scalar_subgroup_f16", "forward_single_scalar", prelude_f16!();
    "special", "counter", "finish", "single", "single_merge_subgroup"
);
/// The shaders that merge in subgroups: they build only on a device with
/// wgpu's `SUBGROUP` feature.
pub const SUBGROUP: &[&str] = &[
    "forward_single_subgroup",
    "forward_single_scalar_subgroup",
    "backward_single_subgroup",
];
/// The files whose kernels write single elements of the big tensors one
/// thread each, which packed f16 (two elements per word) cannot do: they
/// have an f16 variant but no packed one, and the host never picks them
/// for packed f16 storage.
pub const NO_PACKED: &[&str] = &["forward_single_scalar"];

/// Training statistics, stage 2 (Chan merge, running statistics, coefficients).
pub const STATS_FINALIZE: Shader = shader!("stats_finalize", uses "special", uses "finish");
/// After the single-pass forward: counts the batch, saved and running statistics.
pub const SINGLE_FINALIZE: Shader =
    shader!("single_finalize", uses "special", uses "counter", uses "finish");
/// Evaluation coefficients from the running statistics.
pub const EVAL_COEFFS: Shader = shader!("eval_coeffs");
/// Backward stage 2 (dweight, dbias, dx coefficients).
pub const BACKWARD_FINALIZE: Shader = shader!("backward_finalize");
/// Bandwidth roofline: vec4 copy (`GpuContext::copy`, `bnorm bench`).
pub const COPY_VEC4: Shader = shader!("copy_vec4");

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
    SINGLE_FINALIZE,
    FORWARD_SINGLE,
    FORWARD_SINGLE_SCALAR,
    BACKWARD_SINGLE,
    FORWARD_SINGLE_SUBGROUP,
    FORWARD_SINGLE_SCALAR_SUBGROUP,
    BACKWARD_SINGLE_SUBGROUP,
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
    FORWARD_SINGLE_F16,
    FORWARD_SINGLE_SCALAR_F16,
    BACKWARD_SINGLE_F16,
    FORWARD_SINGLE_SUBGROUP_F16,
    FORWARD_SINGLE_SCALAR_SUBGROUP_F16,
    BACKWARD_SINGLE_SUBGROUP_F16,
    STATS_PARTIAL_F16_PACKED,
    STATS_PARTIAL_VEC4_F16_PACKED,
    NORMALIZE_F16_PACKED,
    NORMALIZE_VEC4_F16_PACKED,
    BACKWARD_PARTIAL_F16_PACKED,
    BACKWARD_PARTIAL_VEC4_F16_PACKED,
    BACKWARD_PARTIAL_GATED_F16_PACKED,
    BACKWARD_PARTIAL_VEC4_GATED_F16_PACKED,
    BACKWARD_DX_F16_PACKED,
    BACKWARD_DX_VEC4_F16_PACKED,
    BACKWARD_DX_IN_PLACE_F16_PACKED,
    BACKWARD_DX_VEC4_IN_PLACE_F16_PACKED,
    FORWARD_SINGLE_F16_PACKED,
    BACKWARD_SINGLE_F16_PACKED,
    FORWARD_SINGLE_SUBGROUP_F16_PACKED,
    BACKWARD_SINGLE_SUBGROUP_F16_PACKED,
];
