//! The blocking path of a [`GpuContext`] (record, one submit, wait) and
//! readback, waiting or not.

use super::context::GpuContext;
use super::device::{ErrorScopes, check_usage, map_read_async};
use super::timing::SubmitTimer;
use crate::error::Result;
use std::sync::MutexGuard;

/// A submit in flight: the serializing lock, and its timer while timing is on.
struct Submitted<'a> {
    _serial: MutexGuard<'a, ()>,
    timer: Option<SubmitTimer<'a>>,
}

impl GpuContext {
    /// The blocking path: a new command encoder, `record` into it, one
    /// submit, and a wait for the device. wgpu errors (validation, out of
    /// memory) come back as `Err`, and so does an `Err` of `record`, in which
    /// case nothing is submitted. Timed while GPU timing is on (see
    /// [`GpuContext::set_timestamps`]).
    ///
    /// Every blocking method of this crate is a recording method run through
    /// here, and apps can do the same with several calls at once:
    ///
    /// ```no_run
    /// use wgpu_batchnorm::{BatchNormConfig, GpuBatchNorm, GpuContext, GpuSavedStats, GpuTensor, Layout};
    /// let ctx = GpuContext::new()?;
    /// let mut bn = GpuBatchNorm::new(&ctx, BatchNormConfig::new(4))?;
    /// let x = GpuTensor::from_slice(&ctx, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[2, 4], Layout::ChannelsFirst)?;
    /// let (y1, y2) = (GpuTensor::uninit(&ctx, &[2, 4], Layout::ChannelsFirst)?, GpuTensor::uninit(&ctx, &[2, 4], Layout::ChannelsFirst)?);
    /// let (mut s1, mut s2) = (GpuSavedStats::new(&bn)?, GpuSavedStats::new(&bn)?);
    /// ctx.run("two steps", |enc| {
    ///     bn.record_forward_train(enc, &x, &y1, Some(&mut s1))?;
    ///     bn.record_forward_train(enc, &x, &y2, Some(&mut s2))
    /// })?;
    /// assert_eq!(bn.num_batches_tracked()?, Some(2));
    /// # Ok::<(), wgpu_batchnorm::Error>(())
    /// ```
    ///
    /// # Errors
    /// The first `Err` of `record`; [`crate::Error::Wgpu`]; [`crate::Error::DeviceLost`].
    pub fn run(
        &self,
        label: &str,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        self.run_with(label, true, record)
    }

    /// [`GpuContext::run`] of a closure that cannot fail.
    pub(crate) fn submit(
        &self,
        during: &str,
        record: impl FnOnce(&mut wgpu::CommandEncoder),
    ) -> Result<()> {
        self.run_with(during, true, |enc| {
            record(enc);
            Ok(())
        })
    }

    /// [`GpuContext::run`]; `timed = false` keeps it out of GPU timing (readbacks).
    fn run_with(
        &self,
        during: &str,
        timed: bool,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        let submitted = self.submit_now(during, timed, record)?;
        let handle = self.handle();
        handle.wait(during)?;
        submitted.timer.map_or(Ok(()), |t| t.finish(handle))
    }

    /// Records with `record` into a new encoder (between the timestamps when
    /// `timed` and timing is on) and submits it without waiting; the returned
    /// guard keeps this crate's submits serialized until it is dropped.
    fn submit_now(
        &self,
        during: &str,
        timed: bool,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<Submitted<'_>> {
        let handle = self.handle();
        handle.check_alive()?;
        let serial = self.submit_lock();
        let scope = ErrorScopes::push(&handle.device);
        let mut encoder = handle
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some(during),
            });
        let timer = timed.then(|| self.submit_timer()).flatten();
        if let Some(t) = &timer {
            t.begin(&mut encoder);
        }
        if let Err(e) = record(&mut encoder) {
            drop(encoder);
            // errors of what was recorded before the failure belong to this call too
            scope.pop(during).ok();
            return Err(e);
        }
        if let Some(t) = &timer {
            t.end(&mut encoder);
        }
        handle.queue.submit([encoder.finish()]);
        scope.pop(during)?;
        Ok(Submitted {
            _serial: serial,
            timer,
        })
    }

    /// Submits a copy of `bytes` of `buffer` from byte `offset` into a new
    /// staging buffer, and returns that buffer.
    fn stage_read(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<wgpu::Buffer> {
        check_usage("tensor read back", buffer, wgpu::BufferUsages::COPY_SRC)?;
        let padded = bytes.max(4).next_multiple_of(4);
        let staging = self.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batchnorm.readback"),
            size: padded,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })?;
        self.submit_now("readback", false, |enc| {
            enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, padded);
            Ok(())
        })?;
        Ok(staging)
    }

    /// Copies `bytes` of `buffer` from byte `offset` back to the host, waiting.
    pub(crate) fn read_bytes(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.stage_read(buffer, offset, bytes)?;
        self.handle().map_read(&staging, bytes)
    }

    /// As [`GpuContext::read_bytes`], without waiting: the future resolves once
    /// the device has been polled past the copy.
    pub(crate) fn read_bytes_async(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<impl std::future::Future<Output = Result<Vec<u8>>> + Send + 'static + use<>> {
        // map_async is requested now, so that a poll of the device before the
        // future's first poll completes the mapping
        let pending = (bytes > 0)
            .then(|| self.stage_read(buffer, offset, bytes))
            .transpose()?
            .map(|staging| map_read_async(staging, bytes));
        Ok(async move {
            match pending {
                Some(pending) => pending.await,
                None => Ok(Vec::new()),
            }
        })
    }

    /// Copies `len` f32 values of `buffer` from byte `offset` back to the host.
    pub(crate) fn read_f32(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        len: usize,
    ) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer, offset, (len * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
