//! The literals written once for Rust and WGSL alike: workgroup sizes,
//! flag bits, the storage preludes and the constants block, each a macro
//! that expands to a literal (`src/shaders.rs` makes the Rust constants and,
//! through `concat!`, the shader sources from them).

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
// The storage preludes: the element types of the big tensors and the
// conversions the kernels load and store them with (see shaders/common.wgsl).
macro_rules! prelude_f32 {
    () => {
        "alias Elem = f32;
alias ElemF = f32;
alias ElemU = u32;
alias Elem4 = vec4<f32>;
const PER_WORD: u32 = 1u;
fn load(v: Elem) -> ElemF { return v; }
fn store(v: ElemF) -> Elem { return v; }
fn store_first(v: ElemF, old: Elem) -> Elem { return v; }
fn elem_of(v: ElemF, i: u32) -> f32 { return v; }
fn pair(a: f32, b: f32) -> ElemF { return a; }
fn load4(v: Elem4) -> vec4<f32> { return v; }
fn store4(v: vec4<f32>) -> Elem4 { return v; }
"
    };
}
macro_rules! prelude_f16 {
    () => {
        "enable f16;
alias Elem = f16;
alias ElemF = f32;
alias ElemU = u32;
alias Elem4 = vec4<f16>;
const PER_WORD: u32 = 1u;
fn load(v: Elem) -> ElemF { return f32(v); }
fn store(v: ElemF) -> Elem { return f16(v); }
fn store_first(v: ElemF, old: Elem) -> Elem { return f16(v); }
fn elem_of(v: ElemF, i: u32) -> f32 { return v; }
fn pair(a: f32, b: f32) -> ElemF { return a; }
fn load4(v: Elem4) -> vec4<f32> { return vec4<f32>(v); }
fn store4(v: vec4<f32>) -> Elem4 { return vec4<f16>(v); }
"
    };
}
macro_rules! prelude_f16_packed {
    () => {
        "alias Elem = u32;
alias ElemF = vec2<f32>;
alias ElemU = vec2<u32>;
alias Elem4 = vec2<u32>;
const PER_WORD: u32 = 2u;
fn load(v: Elem) -> ElemF { return unpack2x16float(v); }
fn store(v: ElemF) -> Elem { return pack2x16float(v); }
fn store_first(v: ElemF, old: Elem) -> Elem { return (pack2x16float(v) & 0xffffu) | (old & 0xffff0000u); }
fn elem_of(v: ElemF, i: u32) -> f32 { return v[i & 1u]; }
fn pair(a: f32, b: f32) -> ElemF { return vec2<f32>(a, b); }
fn load4(v: Elem4) -> vec4<f32> { return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)); }
fn store4(v: vec4<f32>) -> Elem4 { return vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw)); }
"
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
