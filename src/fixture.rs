//! Parity fixtures: one BatchNorm call and PyTorch's answer to it, in a
//! safetensors file of format `batchnorm-fixture/1` (specified in `FIXTURES.md`).
//!
//! [`Fixture::load`] reads and checks a file; [`run_fixture`] runs it on a
//! [`FixtureTarget`] (the CPU reference, [`CpuTarget`], or a wgpu device, a
//! [`GpuContext`]) and compares every output with the tolerances of the format:
//!
//! ```text
//! |got - want| <= atol + rtol * |want|        NaN matches only NaN
//! f32 storage, every per-channel tensor:      atol = rtol = 1e-4
//! f16 storage (y, dx, y_eval, dx_eval):       atol = rtol = 5e-3
//! ```
//!
//! ```
//! use wgpu_batchnorm::fixture::{CpuTarget, Fixture, run_fixture};
//!
//! let fixture = Fixture::load("tests/fixtures/bn2d.safetensors")?;
//! let report = run_fixture(&fixture, &CpuTarget);
//! println!("{report}"); // bn2d on cpu-reference: PASS (worst y: max |err| 0.00e0 (0.0% of tolerance))
//! assert!(report.passed());
//! # Ok::<(), wgpu_batchnorm::Error>(())
//! ```

use crate::backend::BatchNormBackend;
use crate::config::{BatchNormConfig, DType, Layout, Mode};
use crate::cpu::CpuBatchNorm;
use crate::error::{Error, Result};
use crate::gpu::{GpuBatchNorm, GpuContext};
use crate::reference::CpuReference;
use crate::shape::ChannelWalk;
use crate::state::BatchNormState;
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The value of the `format` metadata key this module reads.
pub const FORMAT: &str = "batchnorm-fixture/1";

/// Tensors stored in the fixture's storage dtype, with the shape of `x`.
pub const STORAGE_TENSORS: [&str; 6] = ["x", "dy", "y", "dx", "y_eval", "dx_eval"];

/// Tensors of one value per channel, always `F32`, shape `(C,)`.
pub const CHANNEL_TENSORS: [&str; 12] = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "save_mean",
    "save_invstd",
    "dweight",
    "dbias",
    "running_mean_out",
    "running_var_out",
    "dweight_eval",
    "dbias_eval",
];

fn safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
    }
}

/// Elementwise tolerance `|got - want| <= atol + rtol * |want|`; NaN matches only NaN.
///
/// ```
/// use wgpu_batchnorm::fixture::Tolerance;
/// assert!(Tolerance::F32.allows(1.00005, 1.0));
/// assert!(!Tolerance::F32.allows(1.001, 1.0));
/// assert!(Tolerance::F32.allows(f32::NAN, f32::NAN));
/// assert!(!Tolerance::F32.allows(0.0, f32::NAN));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f64,
    /// Relative part, times `|want|`.
    pub rtol: f64,
}

impl Tolerance {
    /// f32 storage and every per-channel tensor: `atol = rtol = 1e-4`.
    pub const F32: Tolerance = Tolerance {
        atol: 1e-4,
        rtol: 1e-4,
    };
    /// f16 storage: `atol = rtol = 5e-3`.
    pub const F16: Tolerance = Tolerance {
        atol: 5e-3,
        rtol: 5e-3,
    };

    /// The tolerance for tensors stored in `dtype`.
    ///
    /// ```
    /// use wgpu_batchnorm::{DType, fixture::Tolerance};
    /// assert_eq!(Tolerance::for_storage(DType::F16), Tolerance::F16);
    /// ```
    pub fn for_storage(dtype: DType) -> Tolerance {
        match dtype {
            DType::F32 => Tolerance::F32,
            DType::F16 => Tolerance::F16,
        }
    }

    /// How much of the allowance `|got - want|` uses: at most 1 within tolerance;
    /// infinite for a NaN mismatch or an infinity that differs; 0 for equal values.
    ///
    /// ```
    /// use wgpu_batchnorm::fixture::Tolerance;
    /// assert!((Tolerance::F32.ratio(1.0001, 1.0) - 0.5).abs() < 1e-3);
    /// assert_eq!(Tolerance::F32.ratio(f32::INFINITY, f32::INFINITY), 0.0);
    /// ```
    pub fn ratio(&self, got: f32, want: f32) -> f64 {
        if got.is_nan() || want.is_nan() {
            return if got.is_nan() && want.is_nan() {
                0.0
            } else {
                f64::INFINITY
            };
        }
        if got == want {
            return 0.0;
        }
        let (g, w) = (f64::from(got), f64::from(want));
        let err = (g - w).abs();
        if !err.is_finite() {
            return f64::INFINITY;
        }
        err / (self.atol + self.rtol * w.abs())
    }

    /// Whether `got` is within tolerance of `want`.
    pub fn allows(&self, got: f32, want: f32) -> bool {
        self.ratio(got, want) <= 1.0
    }
}

/// One tensor of a fixture, widened to `f32`, in row-major order of `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Dtype as stored.
    pub dtype: DType,
    /// Values, widened to `f32` (exactly, for `f16`).
    pub data: Vec<f32>,
}

impl FixtureTensor {
    /// The tensor as an ndarray of its stored shape.
    ///
    /// ```
    /// use wgpu_batchnorm::{DType, fixture::FixtureTensor};
    /// let t = FixtureTensor { shape: vec![2, 1], dtype: DType::F32, data: vec![1.0, 2.0] };
    /// assert_eq!(t.to_array()[[1, 0]], 2.0);
    /// ```
    pub fn to_array(&self) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.data.clone())
            .unwrap_or_else(|_| ArrayD::from_elem(IxDyn(&[0]), 0.0))
    }
}

/// A parsed and checked `batchnorm-fixture/1` file.
///
/// Construction checks everything the runner relies on: the metadata, the
/// presence of the inputs, every known tensor's dtype and shape. Unknown
/// metadata keys and tensors are ignored.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// Where it came from (file path, or the name given to [`Fixture::from_bytes`]).
    pub path: String,
    /// The `case` metadata, or the file stem when absent.
    pub case: String,
    /// The layer: `num_features` from `x`, and `layout`, `eps`, `momentum`,
    /// `affine`, `track_running_stats` from the metadata.
    pub config: BatchNormConfig,
    /// The state before the call: `weight`, `bias`, `running_mean`,
    /// `running_var` tensors and the `num_batches_tracked` metadata.
    pub state: BatchNormState,
    /// The counter after the training call (`num_batches_tracked_out`), when given.
    pub num_batches_tracked_out: Option<u64>,
    /// Storage dtype of `x`, `dy`, `y`, `dx`, `y_eval`, `dx_eval`.
    pub dtype: DType,
    /// `expect = error`: the training call must be refused.
    pub expect_error: bool,
    /// Every metadata entry, as stored.
    pub metadata: BTreeMap<String, String>,
    /// The known tensors present (inputs and expected outputs), by name.
    pub tensors: BTreeMap<String, FixtureTensor>,
}

impl Fixture {
    /// Reads and checks a fixture file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Fixture`], naming the
    /// file and what is wrong, when it is not a valid `batchnorm-fixture/1` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::error::read_file(path)?;
        Self::from_bytes(&bytes, path.display().to_string())
    }

    /// Parses and checks the bytes of a fixture; `name` stands for the file in errors.
    ///
    /// ```
    /// use wgpu_batchnorm::fixture::Fixture;
    /// let err = Fixture::from_bytes(b"not a safetensors file", "junk.safetensors").unwrap_err();
    /// assert!(err.to_string().starts_with("fixture junk.safetensors: not a safetensors file"));
    /// ```
    ///
    /// # Errors
    /// [`Error::Fixture`] naming `name` and what is wrong.
    pub fn from_bytes(bytes: &[u8], name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let bad = |message: String| Error::Fixture {
            path: name.clone(),
            message,
        };
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .ok_or_else(|| {
                bad(format!(
                    "no __metadata__ in the header; a {FORMAT} file needs format, layout, eps, momentum, affine, track_running_stats, num_batches_tracked and dtype"
                ))
            })?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta = |key: &str| -> Result<&str> {
            metadata
                .get(key)
                .map(|s| s.trim())
                .ok_or_else(|| bad(format!("metadata key `{key}` is missing")))
        };
        let format = meta("format")?;
        if format != FORMAT {
            return Err(bad(format!(
                "metadata `format` is {format:?}, expected {FORMAT:?}"
            )));
        }
        let layout_name = meta("layout")?;
        let layout = Layout::parse(layout_name).ok_or_else(|| {
            bad(format!(
                "metadata `layout` is {layout_name:?}, expected \"NCHW\" or \"NHWC\""
            ))
        })?;
        let eps: f64 = parse_meta(meta("eps")?, "eps", "a decimal number").map_err(&bad)?;
        let momentum = match meta("momentum")? {
            m if m.eq_ignore_ascii_case("none") => None,
            m => Some(parse_meta(m, "momentum", "a decimal number or \"none\"").map_err(&bad)?),
        };
        let affine = parse_bool(meta("affine")?, "affine").map_err(&bad)?;
        let track =
            parse_bool(meta("track_running_stats")?, "track_running_stats").map_err(&bad)?;
        let nbt: u64 = parse_meta(
            meta("num_batches_tracked")?,
            "num_batches_tracked",
            "a non-negative integer",
        )
        .map_err(&bad)?;
        let nbt_out = match metadata.get("num_batches_tracked_out") {
            Some(v) => Some(
                parse_meta::<u64>(
                    v.trim(),
                    "num_batches_tracked_out",
                    "a non-negative integer",
                )
                .map_err(&bad)?,
            ),
            None => None,
        };
        let dtype = match meta("dtype")? {
            d if d.eq_ignore_ascii_case("f32") => DType::F32,
            d if d.eq_ignore_ascii_case("f16") => DType::F16,
            d => {
                return Err(bad(format!(
                    "metadata `dtype` is {d:?}, expected \"f32\" or \"f16\""
                )));
            }
        };
        let expect_error = match metadata.get("expect").map(|s| s.trim()) {
            None | Some("") => false,
            Some("error") => true,
            Some(other) => {
                return Err(bad(format!(
                    "metadata `expect` is {other:?}; the only value defined is \"error\""
                )));
            }
        };

        // Tensors: `x` first, for the shape and channel count everything else must match.
        let read = |key: &str, want: DType| -> Result<Option<FixtureTensor>> {
            let view = match st.tensor(key) {
                Ok(v) => v,
                Err(_) => return Ok(None),
            };
            if view.dtype() != safetensors_dtype(want) {
                let why = if STORAGE_TENSORS.contains(&key) {
                    format!("the fixture's storage dtype is {want}")
                } else {
                    "per-channel tensors are always F32".to_string()
                };
                return Err(bad(format!(
                    "tensor `{key}` has dtype {:?}, expected {:?} ({why})",
                    view.dtype(),
                    safetensors_dtype(want)
                )));
            }
            Ok(Some(FixtureTensor {
                shape: view.shape().to_vec(),
                dtype: want,
                data: decode(view.data(), want),
            }))
        };
        let x = read("x", dtype)?.ok_or_else(|| bad("input tensor `x` is missing".into()))?;
        let walk = ChannelWalk::new(&x.shape, layout)
            .map_err(|e| bad(format!("input `x` does not fit layout {layout}: {e}")))?;
        let channels = walk.channels;
        let mut tensors = BTreeMap::new();
        for key in STORAGE_TENSORS.iter().skip(1) {
            if let Some(t) = read(key, dtype)? {
                if t.shape != x.shape {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, expected the shape of `x` {:?}",
                        t.shape, x.shape
                    )));
                }
                tensors.insert(key.to_string(), t);
            }
        }
        for key in CHANNEL_TENSORS {
            if let Some(t) = read(key, DType::F32)? {
                if t.shape != [channels] {
                    return Err(bad(format!(
                        "tensor `{key}` has shape {:?}, expected [{channels}] (one value per channel of `x` {:?}, layout {layout})",
                        t.shape, x.shape
                    )));
                }
                tensors.insert(key.to_string(), t);
            }
        }
        tensors.insert("x".to_string(), x);
        if !tensors.contains_key("dy") {
            return Err(bad("input tensor `dy` is missing".into()));
        }
        let input = |key: &str, wanted: bool, flag: &str| -> Result<Option<Vec<f32>>> {
            match (tensors.get(key), wanted) {
                (Some(t), true) => Ok(Some(t.data.clone())),
                (None, true) => Err(bad(format!(
                    "input tensor `{key}` is missing but metadata says {flag} = true"
                ))),
                (Some(_), false) => Err(bad(format!(
                    "tensor `{key}` is present but metadata says {flag} = false"
                ))),
                (None, false) => Ok(None),
            }
        };
        let state = BatchNormState {
            weight: input("weight", affine, "affine")?,
            bias: input("bias", affine, "affine")?,
            running_mean: input("running_mean", track, "track_running_stats")?,
            running_var: input("running_var", track, "track_running_stats")?,
            num_batches_tracked: track.then_some(nbt),
        };
        let config = BatchNormConfig {
            num_features: channels,
            eps,
            momentum,
            affine,
            track_running_stats: track,
            layout,
        };
        config
            .validate()
            .map_err(|e| bad(format!("the metadata describe an invalid layer: {e}")))?;
        let case = metadata
            .get("case")
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| file_stem(&name));
        Ok(Self {
            path: name,
            case,
            config,
            state,
            num_batches_tracked_out: nbt_out,
            dtype,
            expect_error,
            metadata,
            tensors,
        })
    }

    /// A tensor by name, when present.
    pub fn tensor(&self, name: &str) -> Option<&FixtureTensor> {
        self.tensors.get(name)
    }

    /// The tolerance for tensor `name`: the storage dtype's for storage tensors,
    /// [`Tolerance::F32`] for per-channel ones.
    ///
    /// ```
    /// use wgpu_batchnorm::fixture::{Fixture, Tolerance};
    /// let f = Fixture::load("tests/fixtures/f16_bn2d.safetensors")?;
    /// assert_eq!(f.tolerance("dx"), Tolerance::F16);
    /// assert_eq!(f.tolerance("dweight"), Tolerance::F32);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    pub fn tolerance(&self, name: &str) -> Tolerance {
        if STORAGE_TENSORS.contains(&name) {
            Tolerance::for_storage(self.dtype)
        } else {
            Tolerance::F32
        }
    }

    fn array(&self, name: &str) -> ArrayD<f32> {
        self.tensors
            .get(name)
            .map(FixtureTensor::to_array)
            .unwrap_or_else(|| ArrayD::from_elem(IxDyn(&[0]), 0.0))
    }

    fn has_eval_outputs(&self) -> bool {
        ["y_eval", "dx_eval", "dweight_eval", "dbias_eval"]
            .iter()
            .any(|k| self.tensors.contains_key(*k))
    }
}

fn file_stem(name: &str) -> String {
    Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string())
}

fn parse_meta<T: std::str::FromStr>(value: &str, key: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("metadata `{key}` is {value:?}, expected {what}"))
}

fn parse_bool(value: &str, key: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!(
            "metadata `{key}` is {value:?}, expected \"true\" or \"false\""
        )),
    }
}

fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
    }
}

/// Something fixtures run on: opens a fresh layer for a configuration.
///
/// Implemented by [`CpuTarget`] (the CPU reference) and [`GpuContext`] (a wgpu
/// device); any other [`BatchNormBackend`] plugs in the same way. For an `f16`
/// fixture the runner asks the layer for f16 storage with
/// [`BatchNormBackend::set_storage_dtype`]; a layer that refuses makes the
/// fixture FAIL with the reason, never a silent skip.
///
/// ```
/// use wgpu_batchnorm::{BatchNormBackend, BatchNormConfig, CpuReference, Result};
/// use wgpu_batchnorm::fixture::FixtureTarget;
///
/// /// The CPU reference under another name.
/// struct Mine;
/// impl FixtureTarget for Mine {
///     fn name(&self) -> String {
///         "mine".into()
///     }
///     fn open(&self, config: &BatchNormConfig) -> Result<Box<dyn BatchNormBackend>> {
///         Ok(Box::new(CpuReference::new(config.clone())?))
///     }
/// }
/// assert_eq!(Mine.open(&BatchNormConfig::new(3))?.config().num_features, 3);
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
pub trait FixtureTarget {
    /// Name of the backend in reports, e.g. `cpu-reference` or `vulkan:llvmpipe (...)`.
    fn name(&self) -> String;

    /// A fresh layer for `config`, in PyTorch's initial state, storing f32.
    ///
    /// # Errors
    /// Whatever creating the layer returns (invalid configuration, device errors).
    fn open(&self, config: &BatchNormConfig) -> Result<Box<dyn BatchNormBackend>>;
}

/// The CPU reference ([`CpuReference`]) as a [`FixtureTarget`]. It emulates
/// f16 storage (inputs and outputs rounded to f16, arithmetic in f64).
///
/// ```
/// use wgpu_batchnorm::fixture::{CpuTarget, Fixture, run_fixture};
/// let report = run_fixture(&Fixture::load("tests/fixtures/f16_bn2d.safetensors")?, &CpuTarget);
/// assert!(report.passed(), "{report}");
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTarget;

impl FixtureTarget for CpuTarget {
    fn name(&self) -> String {
        "cpu-reference".into()
    }

    fn open(&self, config: &BatchNormConfig) -> Result<Box<dyn BatchNormBackend>> {
        Ok(Box::new(CpuReference::new(config.clone())?))
    }
}

/// The fast multi-threaded f32 CPU backend ([`CpuBatchNorm`]) as a [`FixtureTarget`].
///
/// ```
/// use wgpu_batchnorm::fixture::{CpuFastTarget, Fixture, run_fixture};
/// let report = run_fixture(&Fixture::load("tests/fixtures/nhwc_2d.safetensors")?, &CpuFastTarget);
/// assert!(report.passed(), "{report}");
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFastTarget;

impl FixtureTarget for CpuFastTarget {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn open(&self, config: &BatchNormConfig) -> Result<Box<dyn BatchNormBackend>> {
        Ok(Box::new(CpuBatchNorm::new(config.clone())?))
    }
}

/// A wgpu device as a [`FixtureTarget`]: a [`GpuBatchNorm`] per run; f16
/// storage where the adapter has `SHADER_F16`.
impl FixtureTarget for GpuContext {
    fn name(&self) -> String {
        self.label()
    }

    fn open(&self, config: &BatchNormConfig) -> Result<Box<dyn BatchNormBackend>> {
        Ok(Box::new(GpuBatchNorm::new(self, config.clone())?))
    }
}

/// The comparison of one output tensor with its expected value.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorCheck {
    /// Tensor name (`y`, `dx`, `running_var_out`, ...).
    pub name: String,
    /// Number of elements compared.
    pub len: usize,
    /// Elements out of tolerance.
    pub bad: usize,
    /// Largest `|got - want|` (infinite for a NaN mismatch).
    pub max_abs_error: f64,
    /// Largest `|got - want| / (atol + rtol * |want|)`: at most 1 when the tensor passes.
    pub ratio: f64,
    /// Where the largest ratio occurs: index into the tensor's shape, got, want.
    pub worst: Option<(Vec<usize>, f32, f32)>,
    /// Tolerance applied.
    pub tolerance: Tolerance,
}

impl TensorCheck {
    /// Compares `got` with `want` elementwise, both in row-major order of `shape`.
    ///
    /// ```
    /// use wgpu_batchnorm::fixture::{TensorCheck, Tolerance};
    /// let c = TensorCheck::compare("y", &[2], &[1.0, 2.5], &[1.0, 2.0], Tolerance::F32);
    /// assert_eq!((c.bad, c.passed()), (1, false));
    /// assert_eq!(c.worst, Some((vec![1], 2.5, 2.0)));
    /// ```
    pub fn compare(
        name: &str,
        shape: &[usize],
        got: &[f32],
        want: &[f32],
        tolerance: Tolerance,
    ) -> Self {
        let mut check = TensorCheck {
            name: name.to_string(),
            len: want.len(),
            bad: 0,
            max_abs_error: 0.0,
            ratio: 0.0,
            worst: None,
            tolerance,
        };
        let mut worst_at = None;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let r = tolerance.ratio(g, w);
            let abs = if r == 0.0 {
                0.0
            } else if r.is_finite() {
                (f64::from(g) - f64::from(w)).abs()
            } else {
                f64::INFINITY
            };
            check.max_abs_error = check.max_abs_error.max(abs);
            if r > 1.0 {
                check.bad += 1;
            }
            if worst_at.is_none() || r > check.ratio {
                check.ratio = r;
                worst_at = Some(i);
            }
        }
        check.worst = worst_at.map(|i| (unravel(i, shape), got[i], want[i]));
        check
    }

    /// Whether every element is within tolerance.
    pub fn passed(&self) -> bool {
        self.bad == 0
    }
}

impl fmt::Display for TensorCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed() {
            return write!(
                f,
                "{}: max |err| {:.2e} ({:.1}% of tolerance)",
                self.name,
                self.max_abs_error,
                self.ratio * 100.0
            );
        }
        write!(
            f,
            "{}: {} of {} elements out of tolerance (atol {:e}, rtol {:e})",
            self.name, self.bad, self.len, self.tolerance.atol, self.tolerance.rtol
        )?;
        if let Some((idx, got, want)) = &self.worst {
            write!(f, "; worst at {idx:?}: got {got}, want {want}")?;
        }
        Ok(())
    }
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = flat % d;
            flat /= d;
        }
    }
    idx
}

/// The outcome of one fixture on one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureReport {
    /// The fixture's case name.
    pub case: String,
    /// The fixture's file.
    pub path: String,
    /// The backend it ran on.
    pub backend: String,
    /// Every tensor compared, in the order compared.
    pub checks: Vec<TensorCheck>,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
}

impl FixtureReport {
    fn new(fixture: &Fixture, backend: String) -> Self {
        Self {
            case: fixture.case.clone(),
            path: fixture.path.clone(),
            backend,
            checks: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// The report of a file that could not be loaded: a FAIL with the load error.
    ///
    /// ```
    /// use wgpu_batchnorm::fixture::{Fixture, FixtureReport};
    /// let err = Fixture::from_bytes(b"", "empty.safetensors").unwrap_err();
    /// let r = FixtureReport::load_failure("empty.safetensors", "-", &err);
    /// assert!(!r.passed());
    /// assert_eq!(r.case, "empty");
    /// ```
    pub fn load_failure(path: &str, backend: &str, error: &Error) -> Self {
        Self {
            case: file_stem(path),
            path: path.to_string(),
            backend: backend.to_string(),
            checks: Vec::new(),
            failures: vec![error.to_string()],
        }
    }

    /// Whether the fixture passed: no failure recorded.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The tensor with the largest share of its tolerance used.
    pub fn worst(&self) -> Option<&TensorCheck> {
        self.checks
            .iter()
            .fold(None, |best: Option<&TensorCheck>, c| match best {
                Some(b) if b.ratio >= c.ratio => Some(b),
                _ => Some(c),
            })
    }

    /// Every failure reason, joined with `"; "` (`None` when it passed).
    pub fn reason(&self) -> Option<String> {
        (!self.passed()).then(|| self.failures.join("; "))
    }

    fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }
}

impl fmt::Display for FixtureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}: ", self.case, self.backend)?;
        match (self.reason(), self.worst()) {
            (Some(r), _) => write!(f, "FAIL: {r}"),
            (None, Some(w)) => write!(f, "PASS (worst {w})"),
            (None, None) => write!(f, "PASS (nothing compared)"),
        }
    }
}

/// Runs `fixture` on `target` and compares every expected tensor present.
///
/// Training, on a fresh layer holding the fixture's input state:
/// `forward_train(x)` against `y`; the saved statistics against `save_mean`,
/// `save_invstd`; `backward(x, dy, Train)` against `dx`, `dweight`, `dbias`;
/// the state afterwards against `running_mean_out`, `running_var_out` and the
/// `num_batches_tracked_out` metadata. With `expect = error`, the training
/// call must be refused and leave the state unchanged.
///
/// Evaluation, when the fixture has `*_eval` tensors, on another fresh layer
/// with the input state: `forward_eval(x)` and `backward(x, dy, Eval)`.
///
/// Never panics on a bad backend result: every problem becomes a failure
/// reason in the report.
///
/// ```no_run
/// use wgpu_batchnorm::{GpuContext, fixture::{Fixture, run_fixture}};
/// let fixture = Fixture::load("tests/fixtures/nhwc_2d.safetensors")?;
/// let report = run_fixture(&fixture, &GpuContext::new()?);
/// println!("{report}");
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
pub fn run_fixture(fixture: &Fixture, target: &dyn FixtureTarget) -> FixtureReport {
    let mut report = FixtureReport::new(fixture, target.name());
    let run = Run { fixture, target };
    let Some(bn) = run.open(&mut report, "train") else {
        return report;
    };
    run.train(bn, &mut report);
    if fixture.has_eval_outputs()
        && let Some(bn) = run.open(&mut report, "eval")
    {
        run.eval(bn, &mut report);
    }
    report
}

struct Run<'a> {
    fixture: &'a Fixture,
    target: &'a dyn FixtureTarget,
}

impl Run<'_> {
    /// A fresh layer storing the fixture's dtype and holding its input state.
    fn open(&self, report: &mut FixtureReport, phase: &str) -> Option<Box<dyn BatchNormBackend>> {
        let mut bn = match self.target.open(&self.fixture.config) {
            Ok(bn) => bn,
            Err(e) => {
                report.fail(format!("{phase}: cannot create the layer: {e}"));
                return None;
            }
        };
        if let Err(e) = bn.set_storage_dtype(self.fixture.dtype) {
            report.fail(format!(
                "{} storage is not supported by this backend: {e}",
                self.fixture.dtype.name()
            ));
            return None;
        }
        if let Err(e) = bn.set_state(&self.fixture.state) {
            report.fail(format!(
                "{phase}: set_state with the input state failed: {e}"
            ));
            return None;
        }
        Some(bn)
    }

    fn compare(&self, report: &mut FixtureReport, name: &str, shape: &[usize], got: &[f32]) {
        let Some(want) = self.fixture.tensor(name) else {
            return;
        };
        if shape != want.shape.as_slice() {
            report.fail(format!(
                "{name}: got shape {shape:?}, expected {:?}",
                want.shape
            ));
            return;
        }
        let check =
            TensorCheck::compare(name, shape, got, &want.data, self.fixture.tolerance(name));
        if !check.passed() {
            report.fail(check.to_string());
        }
        report.checks.push(check);
    }

    fn compare_array(&self, report: &mut FixtureReport, name: &str, got: &ArrayD<f32>) {
        let data: Vec<f32> = got.iter().copied().collect();
        self.compare(report, name, got.shape(), &data);
    }

    fn compare_channels(&self, report: &mut FixtureReport, name: &str, got: Option<&Vec<f32>>) {
        match got {
            Some(v) => self.compare(report, name, &[v.len()], v),
            None if self.fixture.tensor(name).is_some() => report.fail(format!(
                "{name}: the backend returned none, but the fixture expects it"
            )),
            None => {}
        }
    }

    fn train(&self, mut bn: Box<dyn BatchNormBackend>, report: &mut FixtureReport) {
        let fx = self.fixture;
        let x = fx.array("x");
        let result = bn.forward_train(x.view());
        if fx.expect_error {
            match result {
                Ok(_) => report.fail(
                    "expected forward_train to be refused (expect = error), but it returned an output",
                ),
                Err(e) => log::debug!("{}: forward_train refused as expected: {e}", fx.case),
            }
            match bn.state() {
                Ok(s) if same_state(&s, &fx.state) => {}
                Ok(s) => report.fail(format!(
                    "the refused forward_train changed the state (num_batches_tracked {:?} -> {:?})",
                    fx.state.num_batches_tracked, s.num_batches_tracked
                )),
                Err(e) => report.fail(format!("state() failed: {e}")),
            }
            return;
        }
        let y = match result {
            Ok(y) => y,
            Err(e) => {
                report.fail(format!("forward_train failed: {e}"));
                return;
            }
        };
        self.compare_array(report, "y", &y);
        match bn.saved_stats() {
            Ok(Some(s)) => {
                self.compare_channels(report, "save_mean", Some(&s.mean));
                self.compare_channels(report, "save_invstd", Some(&s.invstd));
            }
            Ok(None) => {
                self.compare_channels(report, "save_mean", None);
                self.compare_channels(report, "save_invstd", None);
            }
            Err(e) => report.fail(format!("saved_stats failed: {e}")),
        }
        match bn.state() {
            Ok(s) => {
                self.compare_channels(report, "running_mean_out", s.running_mean.as_ref());
                self.compare_channels(report, "running_var_out", s.running_var.as_ref());
                if let Some(want) = fx.num_batches_tracked_out
                    && s.num_batches_tracked != Some(want)
                {
                    report.fail(format!(
                        "num_batches_tracked after training is {:?}, expected {want}",
                        s.num_batches_tracked
                    ));
                }
            }
            Err(e) => report.fail(format!("state() failed: {e}")),
        }
        let dy = fx.array("dy");
        match bn.backward(x.view(), dy.view(), Mode::Train) {
            Ok(g) => {
                self.compare_array(report, "dx", &g.dx);
                self.compare_channels(report, "dweight", g.dweight.as_ref());
                self.compare_channels(report, "dbias", g.dbias.as_ref());
            }
            Err(e) => report.fail(format!("backward (train) failed: {e}")),
        }
    }

    fn eval(&self, mut bn: Box<dyn BatchNormBackend>, report: &mut FixtureReport) {
        let fx = self.fixture;
        let x = fx.array("x");
        match bn.forward_eval(x.view()) {
            Ok(y) => self.compare_array(report, "y_eval", &y),
            Err(e) => {
                report.fail(format!("forward_eval failed: {e}"));
                return;
            }
        }
        let dy = fx.array("dy");
        match bn.backward(x.view(), dy.view(), Mode::Eval) {
            Ok(g) => {
                self.compare_array(report, "dx_eval", &g.dx);
                self.compare_channels(report, "dweight_eval", g.dweight.as_ref());
                self.compare_channels(report, "dbias_eval", g.dbias.as_ref());
            }
            Err(e) => report.fail(format!("backward (eval) failed: {e}")),
        }
    }
}

/// Bitwise equality of two states (so that NaN equals NaN).
fn same_state(a: &BatchNormState, b: &BatchNormState) -> bool {
    let bits = |v: &Option<Vec<f32>>| {
        v.as_ref()
            .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    };
    bits(&a.weight) == bits(&b.weight)
        && bits(&a.bias) == bits(&b.bias)
        && bits(&a.running_mean) == bits(&b.running_mean)
        && bits(&a.running_var) == bits(&b.running_var)
        && a.num_batches_tracked == b.num_batches_tracked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(0, &[2, 3]), vec![0, 0]);
        assert_eq!(unravel(4, &[2, 3]), vec![1, 1]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
    }

    #[test]
    fn ratio_handles_nan_and_infinity() {
        let t = Tolerance::F32;
        assert_eq!(t.ratio(f32::NAN, 0.0), f64::INFINITY);
        assert_eq!(t.ratio(f32::INFINITY, f32::NEG_INFINITY), f64::INFINITY);
        assert_eq!(t.ratio(f32::INFINITY, 1.0), f64::INFINITY);
        assert!(t.allows(-2.0002, -2.0));
        assert!(!t.allows(-2.0004, -2.0));
    }
}
