//! The device a BatchNorm runs on, with this crate's pipelines built for it.

use super::adapter::{AdapterSelection, matching_adapters};
use super::device::{DeviceHandle, ErrorScopes};
use super::pipelines::Kernels;
use super::timing::Timing;
use crate::error::{Error, Result};
use crate::shaders::WG;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Storage buffers the kernel with the most bindings uses.
const STORAGE_BUFFERS_PER_STAGE: u32 = 4;
/// Bytes of workgroup memory the reductions use (four 4-byte arrays of `WG`).
const WORKGROUP_STORAGE_BYTES: u32 = 4 * WG * 4;

pub(crate) struct ContextInner {
    id: u64,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    handle: DeviceHandle,
    kernels: Kernels,
    /// Serializes this crate's submissions on the device: wgpu's GL backend
    /// gives up on its context lock after a few seconds, so long runs from
    /// several threads must queue here instead.
    submit_lock: Mutex<()>,
    /// GPU timing of submits (see [`GpuContext::set_timestamps`]).
    timing: Timing,
}

/// A wgpu device with this crate's pipelines built for it. Cheap to clone,
/// `Send` and `Sync`: threads share one context, each with its own layers.
///
/// Opened by the crate on an adapter it picks (the easy default), or built
/// around the device and queue an app already owns
/// ([`GpuContext::from_device`]), so that BatchNorm runs on the app's buffers
/// and records into its command encoders.
///
/// ```no_run
/// use wgpu_batchnorm::{AdapterSelection, GpuContext};
/// let best = GpuContext::new()?;                       // best adapter (honours WGPU_BACKEND etc.)
/// let gl = GpuContext::with_selection(&AdapterSelection::default().with_backend(wgpu::Backend::Gl))?;
/// let every = GpuContext::all(&AdapterSelection::from_env())?; // one per adapter, for parity runs
/// println!("{} / {} / {}", best.name(), gl.name(), every.len());
/// # Ok::<(), wgpu_batchnorm::Error>(())
/// ```
#[derive(Clone)]
pub struct GpuContext {
    inner: std::sync::Arc<ContextInner>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("id", &self.inner.id)
            .field("adapter", &self.inner.info.name)
            .field("backend", &self.inner.info.backend)
            .finish()
    }
}

/// What `limits` lacks of this crate's needs, one line per limit.
fn missing_limits(limits: &wgpu::Limits) -> Vec<String> {
    let need = GpuContext::required_limits();
    let mut missing = Vec::new();
    let mut at_least = |name: &str, has: u32, needs: u32| {
        if has < needs {
            missing.push(format!("{name} is {has}, needs at least {needs}"));
        }
    };
    at_least(
        "max_compute_invocations_per_workgroup",
        limits.max_compute_invocations_per_workgroup,
        need.max_compute_invocations_per_workgroup,
    );
    at_least(
        "max_compute_workgroup_size_x",
        limits.max_compute_workgroup_size_x,
        need.max_compute_workgroup_size_x,
    );
    at_least(
        "max_compute_workgroups_per_dimension",
        limits.max_compute_workgroups_per_dimension,
        need.max_compute_workgroups_per_dimension,
    );
    at_least(
        "max_compute_workgroup_storage_size",
        limits.max_compute_workgroup_storage_size,
        need.max_compute_workgroup_storage_size,
    );
    at_least(
        "max_storage_buffers_per_shader_stage",
        limits.max_storage_buffers_per_shader_stage,
        need.max_storage_buffers_per_shader_stage,
    );
    at_least(
        "max_uniform_buffers_per_shader_stage",
        limits.max_uniform_buffers_per_shader_stage,
        need.max_uniform_buffers_per_shader_stage,
    );
    at_least(
        "max_bindings_per_bind_group",
        limits.max_bindings_per_bind_group,
        need.max_bindings_per_bind_group,
    );
    at_least(
        "max_bind_groups",
        limits.max_bind_groups,
        need.max_bind_groups,
    );
    missing
}

impl GpuContext {
    /// The best adapter of [`AdapterSelection::from_env`].
    ///
    /// # Errors
    /// [`Error::NoAdapter`] (with how to get one), [`Error::RequestDevice`].
    pub fn new() -> Result<Self> {
        Self::with_selection(&AdapterSelection::from_env())
    }

    /// The best adapter of `selection`.
    ///
    /// # Errors
    /// [`Error::NoAdapter`], [`Error::RequestDevice`].
    pub fn with_selection(selection: &AdapterSelection) -> Result<Self> {
        let adapter = matching_adapters(selection)
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoAdapter {
                selection: selection.describe(),
            })?;
        Self::from_adapter(&adapter)
    }

    /// One context per adapter of `selection` (for parity runs), best first.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when none matches; the first adapter that fails to open.
    pub fn all(selection: &AdapterSelection) -> Result<Vec<Self>> {
        let adapters = matching_adapters(selection);
        if adapters.is_empty() {
            return Err(Error::NoAdapter {
                selection: selection.describe(),
            });
        }
        adapters.iter().map(Self::from_adapter).collect()
    }

    /// The least a device needs for this crate: 256-thread workgroups, 65535
    /// workgroups per grid dimension, 4 KiB of workgroup memory and 4 storage
    /// buffers per stage (all within wgpu's `downlevel_defaults`). An app that opens its own device and wants
    /// BatchNorm on it asks for at least these
    /// (`adapter_limits_or_defaults.or_better_values_from(&GpuContext::required_limits())`).
    /// [`crate::GpuBatchNorm::record_backward_fused`] also needs 6 storage buffers and 7 bindings.
    pub fn required_limits() -> wgpu::Limits {
        wgpu::Limits {
            max_compute_invocations_per_workgroup: WG,
            max_compute_workgroup_size_x: WG,
            max_compute_workgroups_per_dimension: 65535,
            max_compute_workgroup_storage_size: WORKGROUP_STORAGE_BYTES,
            max_storage_buffers_per_shader_stage: STORAGE_BUFFERS_PER_STAGE,
            max_uniform_buffers_per_shader_stage: 1,
            max_bindings_per_bind_group: STORAGE_BUFFERS_PER_STAGE + 1,
            max_bind_groups: 1,
            ..wgpu::Limits::downlevel_defaults()
        }
    }

    /// The optional features this crate uses when the device has them:
    /// `SHADER_F16` (f16 in WGSL's `f16`, else packed), `TIMESTAMP_QUERY`
    /// and `SUBGROUP` (the single passes' merges in subgroups).
    pub fn optional_features() -> wgpu::Features {
        wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP
    }

    /// Opens a device on `adapter` with the adapter's own limits.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the adapter lacks compute shaders or a
    /// limit of [`GpuContext::required_limits`]; [`Error::RequestDevice`].
    pub fn from_adapter(adapter: &wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        if !adapter
            .get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        {
            return Err(Error::Unsupported {
                adapter: info.name.clone(),
                what: "compute shaders".into(),
            });
        }
        let missing = missing_limits(&limits);
        if !missing.is_empty() {
            return Err(Error::Unsupported {
                adapter: info.name.clone(),
                what: missing.join("; "),
            });
        }
        let features = adapter.features() & Self::optional_features();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("batchnorm"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;
        Self::build(DeviceHandle::new(device, queue, true), info)
    }

    /// A context on the app's own `device` and `queue` (cloned handles: the
    /// app keeps using them). Nothing is opened behind the app's back: this
    /// crate builds its pipelines on the device, allocates its buffers there,
    /// and leaves the app's device-lost callback and error handler alone.
    /// f16 runs in WGSL's `f16` on a device created with `SHADER_F16` (else
    /// packed), GPU timing on one created with `TIMESTAMP_QUERY`.
    ///
    /// ```no_run
    /// use wgpu_batchnorm::GpuContext;
    /// let instance = wgpu::Instance::default();
    /// let adapter = pollster::block_on(instance.request_adapter(&Default::default())).expect("adapter");
    /// let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
    ///     required_limits: adapter.limits(),
    ///     ..Default::default()
    /// })).expect("device");
    /// let ctx = GpuContext::from_device(&device, &queue)?;
    /// assert!(ctx.device() == &device);
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming every limit of
    /// [`GpuContext::required_limits`] the device was created below;
    /// [`Error::Wgpu`] when a pipeline cannot be built.
    pub fn from_device(device: &wgpu::Device, queue: &wgpu::Queue) -> Result<Self> {
        let info = device.adapter_info();
        let missing = missing_limits(&device.limits());
        if !missing.is_empty() {
            return Err(Error::Unsupported {
                adapter: info.name.clone(),
                what: format!(
                    "the device was created with limits too low for BatchNorm: {}; request at least GpuContext::required_limits()",
                    missing.join("; ")
                ),
            });
        }
        Self::build(
            DeviceHandle::new(device.clone(), queue.clone(), false),
            info,
        )
    }

    /// Builds the pipelines on `handle`'s device.
    fn build(handle: DeviceHandle, info: wgpu::AdapterInfo) -> Result<Self> {
        let limits = handle.device.limits();
        let features = handle.device.features() & Self::optional_features();
        let scope = ErrorScopes::push(&handle.device);
        let kernels = Kernels::new(&handle.device);
        scope.pop("pipeline creation")?;
        Ok(Self {
            inner: std::sync::Arc::new(ContextInner {
                id: NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed),
                info,
                limits,
                features,
                handle,
                kernels,
                submit_lock: Mutex::new(()),
                timing: Timing::default(),
            }),
        })
    }

    /// Adapter name.
    pub fn name(&self) -> &str {
        &self.inner.info.name
    }

    /// Adapter description from wgpu.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.inner.info
    }

    /// `backend:name`, e.g. `vulkan:llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub fn label(&self) -> String {
        format!("{}:{}", self.inner.info.backend, self.inner.info.name)
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }

    /// The optional features the device has among those this crate uses.
    pub fn features(&self) -> wgpu::Features {
        self.inner.features
    }

    /// The wgpu device, for applications that run their own passes beside this crate's.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.handle.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.handle.queue
    }

    /// A number unique to this context in the process.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The device, queue and loss state.
    pub(crate) fn handle(&self) -> &DeviceHandle {
        &self.inner.handle
    }

    /// The lock that serializes this crate's submits on the device.
    pub(crate) fn submit_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .submit_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The timer of a submit, while GPU timing is on.
    pub(crate) fn submit_timer(&self) -> Option<super::timing::SubmitTimer<'_>> {
        self.inner.timing.submit_timer()
    }

    /// The pipelines built for this device.
    pub(crate) fn kernels(&self) -> &Kernels {
        &self.inner.kernels
    }

    /// Checks that a tensor of `bytes` fits one buffer of the device (BatchNorm
    /// binds a tensor larger than one storage binding in chunks of rows).
    pub(crate) fn check_tensor_size(&self, what: &str, bytes: u64) -> Result<()> {
        let limit = self.inner.limits.max_buffer_size;
        if bytes > limit {
            return Err(Error::TooLarge {
                what: what.into(),
                bytes,
                limit_name: "max_buffer_size",
                limit,
            });
        }
        Ok(())
    }

    /// Checks that a buffer of `bytes` fits the device as a storage binding.
    pub(crate) fn check_storage_size(&self, what: &str, bytes: u64) -> Result<()> {
        let l = &self.inner.limits;
        let (limit_name, limit) = if l.max_storage_buffer_binding_size < l.max_buffer_size {
            (
                "max_storage_buffer_binding_size",
                l.max_storage_buffer_binding_size,
            )
        } else {
            ("max_buffer_size", l.max_buffer_size)
        };
        if bytes > limit {
            return Err(Error::TooLarge {
                what: what.into(),
                bytes,
                limit_name,
                limit,
            });
        }
        Ok(())
    }

    /// A storage buffer of `bytes` (at least 16), readable, writable and copyable.
    pub(crate) fn storage_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.inner.handle.storage_buffer(label, bytes)
    }

    /// A storage buffer holding `data`.
    pub(crate) fn storage_buffer_init(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        self.inner.handle.storage_buffer_init(label, data)
    }

    /// A buffer of `desc`, with out-of-memory and validation errors as `Err`.
    pub(crate) fn create_buffer(&self, desc: &wgpu::BufferDescriptor<'_>) -> Result<wgpu::Buffer> {
        self.inner.handle.create_buffer(desc)
    }

    /// Whether the device can time submits with timestamp queries
    /// (`wgpu::Features::TIMESTAMP_QUERY`).
    pub fn has_timestamps(&self) -> bool {
        self.features().contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Turns GPU timing on or off. While on, the passes of every operation's
    /// submit are bracketed by two timestamp queries, the submit waits for
    /// them, and [`GpuContext::last_gpu_time`] gives the GPU time between them
    /// (readbacks are not timed). Turning it on or off forgets the last time.
    ///
    /// ```no_run
    /// use wgpu_batchnorm::{BatchNormConfig, GpuBatchNorm, GpuContext, GpuTensor};
    /// let ctx = GpuContext::new()?;
    /// let mut bn = GpuBatchNorm::new(&ctx, BatchNormConfig::new(64))?;
    /// let x = vec![1.0; 8 * 64 * 256];
    /// let x = GpuTensor::from_slice(&ctx, &x, &[8, 64, 256], bn.config().layout)?;
    /// if ctx.has_timestamps() {
    ///     ctx.set_timestamps(true)?;
    ///     bn.run_forward_train(&x)?;
    ///     println!("{:?} on the GPU", ctx.last_gpu_time());
    /// }
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Unsupported`] when turning it on and the adapter lacks
    /// `TIMESTAMP_QUERY`; [`Error::Wgpu`] when the query set cannot be made.
    pub fn set_timestamps(&self, on: bool) -> Result<()> {
        if on && !self.has_timestamps() {
            return Err(Error::Unsupported {
                adapter: self.name().to_string(),
                what: "timestamp queries (wgpu feature TIMESTAMP_QUERY)".into(),
            });
        }
        self.inner.timing.set(self.device(), on)
    }

    /// Whether GPU timing is on (see [`GpuContext::set_timestamps`]).
    pub fn timestamps_enabled(&self) -> bool {
        self.inner.timing.enabled()
    }

    /// GPU time of the last timed submit, from its two timestamps and
    /// `wgpu::Queue::get_timestamp_period`; `None` while timing is off, before
    /// the first timed submit, or when the device gave unusable timestamps.
    pub fn last_gpu_time(&self) -> Option<Duration> {
        self.inner.timing.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_context() -> Option<GpuContext> {
        match GpuContext::new() {
            Ok(c) => Some(c),
            Err(e) if std::env::var("CI").is_ok() || std::env::var("BNORM_REQUIRE_GPU").is_ok() => {
                panic!("a GPU adapter is required: {e}")
            }
            Err(e) => {
                eprintln!("*** SKIPPED: {e} ***");
                None
            }
        }
    }

    #[test]
    fn validation_errors_come_back_as_err() {
        let Some(ctx) = first_context() else { return };
        let k = &ctx.kernels().f32.stats_partial;
        // a 16-byte uniform where the shader's Params needs 48: invalid at dispatch
        let small = ctx.storage_buffer("too small", 16).unwrap();
        let uniform = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("uniform too small"),
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: false,
        });
        let scope = ErrorScopes::push(ctx.device());
        let bg = k.bind(ctx.device(), &[&uniform, &small, &small]);
        let bind_err = scope.pop("bind");
        let result = match bind_err {
            Err(e) => Err(e),
            Ok(()) => ctx.submit("invalid dispatch", |enc| {
                crate::gpu::kernels::dispatch_alone(enc, k, &bg, 1, 65535);
            }),
        };
        let err = result.expect_err("an invalid dispatch must be refused");
        assert!(matches!(err, Error::Wgpu { .. }), "{err:?}");
        // the device stays usable
        let buf = ctx
            .storage_buffer_init("ok", bytemuck::cast_slice(&[1.0f32, 2.0, 3.0, 4.0]))
            .unwrap();
        assert_eq!(ctx.read_f32(&buf, 0, 4).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
