//! Adapter choice and the device a BatchNorm runs on.

use super::kernels::Kernels;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Which adapter(s) to use.
///
/// [`AdapterSelection::from_env`] reads wgpu's own variables: `WGPU_BACKEND`
/// (e.g. `vulkan`, `gl`, `metal`, `dx12`, comma-separated), `WGPU_ADAPTER_NAME`
/// (a case-insensitive substring of the adapter name) and `WGPU_POWER_PREF`
/// (`low`, `high`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSelection {
    /// Backends to look at.
    pub backends: wgpu::Backends,
    /// Case-insensitive substring the adapter name must contain.
    pub name: Option<String>,
    /// Preferred kind of adapter when several match.
    pub power_preference: wgpu::PowerPreference,
}

impl Default for AdapterSelection {
    /// Every native backend, any name, high performance first.
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::PRIMARY | wgpu::Backends::GL,
            name: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
        }
    }
}

impl AdapterSelection {
    /// The default selection, narrowed by `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`
    /// and `WGPU_POWER_PREF` when they are set.
    pub fn from_env() -> Self {
        let mut sel = Self::default();
        if let Some(b) = wgpu::Backends::from_env() {
            sel.backends = b;
        }
        if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME")
            && !name.is_empty()
        {
            sel.name = Some(name);
        }
        if let Some(p) = wgpu::PowerPreference::from_env() {
            sel.power_preference = p;
        }
        sel
    }

    /// Only `backend`.
    pub fn with_backend(mut self, backend: wgpu::Backend) -> Self {
        self.backends = wgpu::Backends::from(backend);
        self
    }

    /// Only adapters whose name contains `name` (case-insensitive).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    fn describe(&self) -> String {
        let mut s = format!(" among backends {:?}", self.backends);
        if let Some(n) = &self.name {
            s.push_str(&format!(" with a name containing {n:?}"));
        }
        s
    }

    fn matches(&self, info: &wgpu::AdapterInfo) -> bool {
        self.name
            .as_ref()
            .is_none_or(|n| info.name.to_lowercase().contains(&n.to_lowercase()))
    }
}

/// Parses a backend name as `bnorm` and the environment spell it.
pub fn parse_backend(name: &str) -> Option<wgpu::Backend> {
    match name.to_ascii_lowercase().as_str() {
        "vulkan" | "vk" => Some(wgpu::Backend::Vulkan),
        "gl" | "gles" | "opengl" => Some(wgpu::Backend::Gl),
        "metal" | "mtl" => Some(wgpu::Backend::Metal),
        "dx12" | "d3d12" => Some(wgpu::Backend::Dx12),
        _ => None,
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

fn rank(info: &wgpu::AdapterInfo, pref: wgpu::PowerPreference) -> (u8, u8) {
    use wgpu::DeviceType as D;
    let kind = match (info.device_type, pref) {
        (D::DiscreteGpu, wgpu::PowerPreference::LowPower) => 1,
        (D::IntegratedGpu, wgpu::PowerPreference::LowPower) => 0,
        (D::DiscreteGpu, _) => 0,
        (D::IntegratedGpu, _) => 1,
        (D::VirtualGpu, _) => 2,
        (D::Cpu, _) => 3,
        (D::Other, _) => 4,
    };
    let backend = u8::from(info.backend == wgpu::Backend::Gl);
    (kind, backend)
}

/// Adapters that match `selection` and can run compute shaders, best first.
fn matching_adapters(selection: &AdapterSelection) -> Vec<wgpu::Adapter> {
    let instance = instance(selection.backends);
    let mut adapters: Vec<wgpu::Adapter> =
        pollster::block_on(instance.enumerate_adapters(selection.backends))
            .into_iter()
            .filter(|a| selection.matches(&a.get_info()))
            .filter(|a| {
                a.get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
            })
            .collect();
    adapters.sort_by_key(|a| rank(&a.get_info(), selection.power_preference));
    adapters
}

/// Every adapter wgpu finds for `selection`, best first, whether or not it can run this crate.
pub fn enumerate_adapters(selection: &AdapterSelection) -> Vec<wgpu::Adapter> {
    let instance = instance(selection.backends);
    let mut adapters: Vec<wgpu::Adapter> =
        pollster::block_on(instance.enumerate_adapters(selection.backends))
            .into_iter()
            .filter(|a| selection.matches(&a.get_info()))
            .collect();
    adapters.sort_by_key(|a| rank(&a.get_info(), selection.power_preference));
    adapters
}

pub(crate) struct ContextInner {
    pub id: u64,
    pub info: wgpu::AdapterInfo,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub kernels: Kernels,
    lost: Arc<Mutex<Option<String>>>,
    /// Serializes this crate's submissions on the device: wgpu's GL backend
    /// gives up on its context lock after a few seconds, so long runs from
    /// several threads must queue here instead.
    submit_lock: Mutex<()>,
    /// The vec4 copy of [`GpuContext::copy`].
    pub copy_kernel: super::copy::CopyKernel,
    /// GPU timing of submits (see [`GpuContext::set_timestamps`]).
    pub timing: super::timing::Timing,
}

/// A wgpu device with this crate's pipelines built for it. Cheap to clone.
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
    pub(crate) inner: Arc<ContextInner>,
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

    /// Opens a device on `adapter` with the adapter's own limits.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the adapter lacks compute shaders or 256-thread
    /// workgroups; [`Error::RequestDevice`].
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
        if limits.max_compute_invocations_per_workgroup < super::kernels::WG
            || limits.max_compute_workgroup_size_x < super::kernels::WG
            || limits.max_storage_buffers_per_shader_stage < 6
        {
            return Err(Error::Unsupported {
                adapter: info.name.clone(),
                what: format!(
                    "256-thread workgroups and 6 storage buffers per stage (has {} threads, {} buffers)",
                    limits.max_compute_invocations_per_workgroup,
                    limits.max_storage_buffers_per_shader_stage
                ),
            });
        }
        let features =
            adapter.features() & (wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY);
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
        let lost = Arc::new(Mutex::new(None));
        let lost_cb = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = lost_cb.lock() {
                *l = Some(format!("{reason:?}: {message}"));
            }
        });
        let scope = ErrorScopes::push(&device);
        let kernels = Kernels::new(&device, features.contains(wgpu::Features::SHADER_F16));
        let copy_kernel = super::copy::CopyKernel::new(&device);
        scope.pop("pipeline creation")?;
        Ok(Self {
            inner: Arc::new(ContextInner {
                id: NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed),
                info,
                device,
                queue,
                limits,
                features,
                kernels,
                lost,
                submit_lock: Mutex::new(()),
                copy_kernel,
                timing: Default::default(),
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
        &self.inner.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// A number unique to this context in the process.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Errors when the device was lost.
    pub(crate) fn check_alive(&self) -> Result<()> {
        match self.inner.lost.lock().ok().and_then(|l| l.clone()) {
            Some(m) => Err(Error::DeviceLost(m)),
            None => Ok(()),
        }
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
    pub(crate) fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `data`.
    pub(crate) fn storage_buffer_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let mut contents = data.to_vec();
        contents.resize(data.len().max(16).next_multiple_of(4), 0);
        self.inner
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// Records with `record`, submits once and waits, turning wgpu errors into
    /// `Err`; timed while GPU timing is on (see [`GpuContext::set_timestamps`]).
    pub(crate) fn submit(
        &self,
        during: &str,
        record: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        self.submit_with(during, true, record)
    }

    /// [`GpuContext::submit`]; `timed = false` keeps it out of GPU timing (readbacks).
    pub(crate) fn submit_with(
        &self,
        during: &str,
        timed: bool,
        record: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        self.check_alive()?;
        let _serial = self
            .inner
            .submit_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let device = &self.inner.device;
        let scope = ErrorScopes::push(device);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some(during),
        });
        let timer = timed.then(|| self.inner.timing.submit_timer()).flatten();
        if let Some(t) = &timer {
            t.begin(&mut encoder);
        }
        record(&mut encoder);
        if let Some(t) = &timer {
            t.end(&mut encoder);
        }
        self.inner.queue.submit([encoder.finish()]);
        scope.pop(during)?;
        self.wait(during)?;
        timer.map_or(Ok(()), |t| t.finish(self))
    }

    /// Waits for all submitted work.
    pub(crate) fn wait(&self, during: &str) -> Result<()> {
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Wgpu {
                during: during.into(),
                message: e.to_string(),
            })?;
        self.check_alive()
    }

    /// Copies the first `bytes` of `buffer` back to the host.
    pub(crate) fn read_bytes(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let padded = bytes.max(4).next_multiple_of(4);
        let staging = self.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batchnorm.readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.submit_with("readback", false, |enc| {
            enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, padded);
        })?;
        self.map_read(&staging, bytes)
    }

    /// Maps `staging` (a `MAP_READ` buffer whose copy was submitted), returns
    /// its first `bytes` and unmaps it.
    pub(crate) fn map_read(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let slice = staging.slice(..);
        let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            tx.send(r).ok();
        });
        self.wait("readback")?;
        match pollster::block_on(rx.receive()) {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Readback(e.to_string())),
            None => return Err(Error::Readback("map callback dropped".into())),
        }
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::Readback(e.to_string()))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Copies `len` f32 values of `buffer` back to the host.
    pub(crate) fn read_f32(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer, (len * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// Validation, out-of-memory and internal error scopes, popped together.
pub(crate) struct ErrorScopes {
    guards: Vec<wgpu::ErrorScopeGuard>,
}

impl ErrorScopes {
    pub fn push(device: &wgpu::Device) -> Self {
        Self {
            guards: vec![
                device.push_error_scope(wgpu::ErrorFilter::Validation),
                device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
                device.push_error_scope(wgpu::ErrorFilter::Internal),
            ],
        }
    }

    pub fn pop(mut self, during: &str) -> Result<()> {
        let mut first = None;
        while let Some(guard) = self.guards.pop() {
            if let Some(e) = pollster::block_on(guard.pop())
                && first.is_none()
            {
                first = Some(e.to_string());
            }
        }
        match first {
            Some(message) => Err(Error::Wgpu {
                during: during.into(),
                message,
            }),
            None => Ok(()),
        }
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
        let k = &ctx.inner.kernels.f32.stats_partial;
        // a 16-byte uniform where the shader's Params needs 48: invalid at dispatch
        let small = ctx.storage_buffer("too small", 16);
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
                super::super::kernels::dispatch(enc, k, &bg, 1, 65535);
            }),
        };
        let err = result.expect_err("an invalid dispatch must be refused");
        assert!(matches!(err, Error::Wgpu { .. }), "{err:?}");
        // the device stays usable
        let buf = ctx.storage_buffer_init("ok", bytemuck::cast_slice(&[1.0f32, 2.0, 3.0, 4.0]));
        assert_eq!(ctx.read_f32(&buf, 4).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}
