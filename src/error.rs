//! The crate's error type.

use crate::layout::Layout;

/// Everything that can go wrong in this crate. Each message names the value
/// or shape that was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No wgpu adapter matched the request.
    #[error(
        "no GPU adapter found{selection}; install a GPU driver (on headless Linux, `apt-get install mesa-vulkan-drivers` gives the software Vulkan device lavapipe) or pick another backend with WGPU_BACKEND"
    )]
    NoAdapter {
        /// What was asked for, e.g. " for backend gl and name \"llvmpipe\"".
        selection: String,
    },
    /// The adapter refused to open a device.
    #[error("could not open a device on adapter {adapter:?}: {message}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// wgpu's message.
        message: String,
    },
    /// The configuration is invalid.
    #[error("invalid BatchNorm configuration: {0}")]
    Config(String),
    /// The tensor has a rank the layout does not support.
    #[error(
        "expected a tensor of rank {min_rank} to 5 for layout {layout} (got shape {shape:?}, rank {rank})"
    )]
    Rank {
        /// Shape given.
        shape: Vec<usize>,
        /// Its rank.
        rank: usize,
        /// Smallest rank the layout takes.
        min_rank: usize,
        /// Layout used.
        layout: Layout,
    },
    /// The tensor's channel count does not match `num_features`.
    #[error(
        "channel count mismatch: the BatchNorm has {expected} features but the tensor of shape {shape:?} ({layout}) has {got} channels"
    )]
    ChannelMismatch {
        /// `num_features`.
        expected: usize,
        /// Channels found in the tensor.
        got: usize,
        /// Shape given.
        shape: Vec<usize>,
        /// Layout used.
        layout: Layout,
    },
    /// The tensor has no elements.
    #[error("empty tensor: shape {shape:?} has no elements")]
    Empty {
        /// Shape given.
        shape: Vec<usize>,
    },
    /// Training statistics need at least two values per channel.
    #[error(
        "expected more than 1 value per channel when training, got input of shape {shape:?} (1 value per channel)"
    )]
    SingleValuePerChannel {
        /// Shape given.
        shape: Vec<usize>,
    },
    /// Two tensors that must match in shape do not.
    #[error("shape mismatch: {what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Which tensor.
        what: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape given.
        got: Vec<usize>,
    },
    /// A tensor's layout differs from the BatchNorm's.
    #[error("layout mismatch: {what} is {got}, the BatchNorm expects {expected}")]
    LayoutMismatch {
        /// Which tensor.
        what: String,
        /// Expected layout.
        expected: Layout,
        /// Layout given.
        got: Layout,
    },
    /// A tensor's element type differs from what the call expects.
    #[error("dtype mismatch: {what} is {got}, expected {expected}")]
    DTypeMismatch {
        /// Which tensor.
        what: String,
        /// Expected dtype.
        expected: String,
        /// Dtype given.
        got: String,
    },
    /// A tensor is too large for the device and cannot be split.
    #[error(
        "tensor too large for the device: {what} needs {bytes} bytes but the device's {limit_name} is {limit} bytes"
    )]
    TooLarge {
        /// Which tensor.
        what: String,
        /// Bytes needed.
        bytes: u64,
        /// Limit name in wgpu::Limits.
        limit_name: &'static str,
        /// Device limit.
        limit: u64,
    },
    /// A tensor was created on another device than the BatchNorm's.
    #[error(
        "device mismatch: {what} lives on device #{got} ({got_name}) but the BatchNorm runs on device #{expected} ({expected_name})"
    )]
    DeviceMismatch {
        /// Which tensor.
        what: String,
        /// Context id of the BatchNorm.
        expected: u64,
        /// Adapter name of the BatchNorm.
        expected_name: String,
        /// Context id of the tensor.
        got: u64,
        /// Adapter name of the tensor.
        got_name: String,
    },
    /// A buffer lacks a usage flag that its use needs.
    #[error("{what}: the buffer's usage {usage} lacks {needed}")]
    BufferUsage {
        /// Which buffer and what it is used for.
        what: String,
        /// The missing flags.
        needed: String,
        /// The flags the buffer has.
        usage: String,
    },
    /// A byte offset into a buffer is not a multiple of the alignment the device needs.
    #[error(
        "{what}: byte offset {offset} is not a multiple of the device's min_storage_buffer_offset_alignment ({alignment})"
    )]
    Misaligned {
        /// Which tensor.
        what: String,
        /// The offset given.
        offset: u64,
        /// The device's alignment.
        alignment: u64,
    },
    /// A buffer ends before the tensor viewed in it.
    #[error("{what}: needs bytes {offset}..{end} of the buffer, which has {size} bytes")]
    BufferTooSmall {
        /// Which tensor, with shape and dtype.
        what: String,
        /// First byte of the view.
        offset: u64,
        /// One past the last byte the view needs (its size rounded up to 4 bytes).
        end: u64,
        /// The buffer's size.
        size: u64,
    },
    /// Two tensors of one call share a buffer in a way one dispatch cannot
    /// bind (wgpu tracks usage per buffer: a buffer written by a dispatch may
    /// not be bound a second time in it).
    #[error(
        "{what} and {other} are views of the same buffer, which one dispatch would both read and write; use separate buffers"
    )]
    BufferAlias {
        /// The tensor written.
        what: String,
        /// The tensor it shares a buffer with.
        other: String,
    },
    /// Saved statistics given to a backward do not belong to it.
    #[error("saved statistics do not fit this backward: {why}")]
    SavedStatsMismatch {
        /// What differs.
        why: String,
    },
    /// A parameter vector has the wrong length.
    #[error("{name} has length {got}, expected {expected} (num_features)")]
    ParameterLength {
        /// Parameter name (PyTorch's).
        name: String,
        /// `num_features`.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A parameter or statistic that the configuration does not have was given or asked for.
    #[error("{name} does not exist: {why}")]
    MissingParameter {
        /// Parameter name (PyTorch's).
        name: String,
        /// Which config flag rules it out.
        why: String,
    },
    /// A fused backward's residual gradient `dz` does not fit its fusion:
    /// missing with a residual, or given without one.
    #[error("fused backward of {fusion}: {why}")]
    FusedGradient {
        /// The fusion's name (`add`, `add_relu`, `relu`, `none`).
        fusion: String,
        /// What is missing or extra.
        why: String,
    },
    /// Backward in training mode needs the statistics of a training forward.
    #[error(
        "no saved batch statistics for backward: run forward_train (or forward_eval without tracked statistics) on this input first{detail}"
    )]
    NoSavedStatistics {
        /// Extra context (the shape that was saved).
        detail: String,
    },
    /// The device does not support something the call needs.
    #[error("unsupported on adapter {adapter:?}: {what}")]
    Unsupported {
        /// Adapter name.
        adapter: String,
        /// What is missing.
        what: String,
    },
    /// A wgpu validation, out-of-memory or internal error.
    #[error("wgpu error during {during}: {message}")]
    Wgpu {
        /// Which operation.
        during: String,
        /// wgpu's message.
        message: String,
    },
    /// The device was lost (driver reset, GPU removed).
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// Reading a buffer back failed.
    #[error("buffer readback failed: {0}")]
    Readback(String),
    /// A synchronized training step saw at most one value per channel across
    /// all ranks together.
    #[error(
        "expected more than 1 value per channel when training, got {count} in the whole synchronized batch (all ranks together)"
    )]
    SingleValueAcrossRanks {
        /// Values per channel in the whole synchronized batch.
        count: u64,
    },
    /// A collective (all-gather, all-reduce) of a synchronized BatchNorm
    /// failed, or another rank failed its part of the step; nothing changed.
    #[error("synchronized BatchNorm: {op} failed on rank {rank}: {message}")]
    Collective {
        /// The collective operation, e.g. `all_gather_f64`.
        op: &'static str,
        /// The rank that reports the error.
        rank: usize,
        /// What went wrong (the transport's message, or which rank failed).
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was attempted: `read`, `write`.
        action: &'static str,
        /// The file.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A parity fixture (`batchnorm-fixture/1`) is malformed.
    #[error("fixture {path}: {message}")]
    Fixture {
        /// The file (or the name given to in-memory bytes).
        path: String,
        /// What is wrong, naming the key, tensor, dtype or shape.
        message: String,
    },
    /// A BatchNorm cannot be folded into the layer before it.
    #[error("cannot fold {batchnorm} into {layer}: {message}")]
    Fold {
        /// The BatchNorm: "the BatchNorm", or its module path.
        batchnorm: String,
        /// The layer: its kind and weight shape, and its module path.
        layer: String,
        /// What does not fit, naming the value, channel or shape.
        message: String,
    },
    /// A checkpoint (safetensors `state_dict`) is malformed or does not fit the layer.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file (or the name given to in-memory bytes).
        path: String,
        /// What is wrong, naming the key, dtype or shape.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads a whole file, an [`Error::Io`] naming it when that fails.
#[cfg(feature = "safetensors")]
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        action: "read",
        path: path.display().to_string(),
        source,
    })
}
