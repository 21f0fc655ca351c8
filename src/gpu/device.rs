//! The wgpu device and queue under a [`GpuContext`](super::GpuContext): error
//! scopes, waiting, readback and buffer creation.

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// A device, its queue, and whether the device was lost.
pub(crate) struct DeviceHandle {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    lost: Arc<Mutex<Option<String>>>,
}

impl DeviceHandle {
    /// Wraps `device` and `queue`. With `track_loss` (a device this crate
    /// opened) it installs the device-lost callback; an app's own device keeps
    /// the app's callback, and its loss shows up as errors of the calls.
    pub fn new(device: wgpu::Device, queue: wgpu::Queue, track_loss: bool) -> Self {
        let lost = Arc::new(Mutex::new(None));
        if track_loss {
            let lost_cb = Arc::clone(&lost);
            device.set_device_lost_callback(move |reason, message| {
                if let Ok(mut l) = lost_cb.lock() {
                    *l = Some(format!("{reason:?}: {message}"));
                }
            });
        }
        Self {
            device,
            queue,
            lost,
        }
    }

    /// Errors when the device was lost.
    pub fn check_alive(&self) -> Result<()> {
        match self.lost.lock().ok().and_then(|l| l.clone()) {
            Some(m) => Err(Error::DeviceLost(m)),
            None => Ok(()),
        }
    }

    /// Waits for all submitted work, in waits of at most [`WAIT_SLICE`]: wgpu's
    /// GL backend holds its adapter context for the whole of a wait, and
    /// another thread that needs the context meanwhile (to create a buffer,
    /// say) panics after 6 s, so a long submit on a slow GL device must let
    /// go of it now and then. Elsewhere the slices cost one wake-up each.
    /// A device lost meanwhile ends the wait with [`Error::DeviceLost`].
    pub fn wait(&self, during: &str) -> Result<()> {
        loop {
            match self.device.poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(WAIT_SLICE),
            }) {
                Ok(_) => break,
                Err(wgpu::PollError::Timeout) => self.check_alive()?,
                Err(e) => {
                    return Err(Error::Wgpu {
                        during: during.into(),
                        message: e.to_string(),
                    });
                }
            }
        }
        self.check_alive()
    }

    /// Maps `staging` (a `MAP_READ` buffer whose copy was submitted), waits
    /// for the device, returns its first `bytes` and unmaps it.
    pub fn map_read(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let pending = map_read_async(staging.clone(), bytes);
        self.wait("readback")?;
        pollster::block_on(pending)
    }

    /// A buffer of `desc`, or the out-of-memory or validation error as `Err`.
    pub fn create_buffer(&self, desc: &wgpu::BufferDescriptor<'_>) -> Result<wgpu::Buffer> {
        let scope = ErrorScopes::push(&self.device);
        let buffer = self.device.create_buffer(desc);
        scope.pop(desc.label.unwrap_or("buffer creation"))?;
        Ok(buffer)
    }

    /// A storage buffer of `bytes` (at least 16), readable, writable and copyable.
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(4),
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `data`.
    pub fn storage_buffer_init(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let mut contents = data.to_vec();
        contents.resize(data.len().max(16).next_multiple_of(4), 0);
        let scope = ErrorScopes::push(&self.device);
        let buffer = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &contents,
                usage: STORAGE_USAGE,
            });
        scope.pop(label)?;
        Ok(buffer)
    }
}

/// Maps `staging` (a `MAP_READ` buffer whose copy was submitted) and resolves
/// to its first `bytes` once the device has been polled past the copy.
pub(crate) fn map_read_async(
    staging: wgpu::Buffer,
    bytes: u64,
) -> impl std::future::Future<Output = Result<Vec<u8>>> + Send + 'static {
    let (tx, rx) = futures_intrusive::channel::shared::oneshot_channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        tx.send(r).ok();
    });
    async move {
        match rx.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::Readback(e.to_string())),
            None => return Err(Error::Readback("map callback dropped".into())),
        }
        let slice = staging.slice(..);
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::Readback(e.to_string()))?;
        let out = view[..bytes as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }
}

/// The longest single wait of [`DeviceHandle::wait`].
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(20);

/// Usage of the storage buffers this crate allocates.
pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

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

    /// Pops the scopes; the first error caught becomes an [`Error::Wgpu`].
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

/// Errors unless `buffer`'s usage has `needed`.
pub(crate) fn check_usage(
    what: &str,
    buffer: &wgpu::Buffer,
    needed: wgpu::BufferUsages,
) -> Result<()> {
    if !buffer.usage().contains(needed) {
        return Err(Error::BufferUsage {
            what: what.into(),
            needed: format!("{needed:?}"),
            usage: format!("{:?}", buffer.usage()),
        });
    }
    Ok(())
}
