//! GPU timing of submits with timestamp queries, for `bnorm bench`.
//!
//! While timing is on, `GpuContext::submit` brackets the
//! recorded passes between two empty compute passes that write timestamps
//! (the first at its start, the second at its end), resolves the two queries
//! into a buffer, and reads them back after the wait.

use super::device::{DeviceHandle, ErrorScopes};
use crate::error::Result;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Per-context timing state.
#[derive(Default)]
pub(crate) struct Timing {
    state: Mutex<TimingState>,
}

#[derive(Default)]
pub(crate) struct TimingState {
    /// Present while timing is on.
    queries: Option<TimestampQueries>,
    /// GPU time of the last timed submit.
    last: Option<Duration>,
}

/// A query set of two timestamps, and buffers to resolve and read them.
struct TimestampQueries {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
}

impl TimestampQueries {
    fn new(device: &wgpu::Device) -> Self {
        let bytes = 2 * u64::from(wgpu::QUERY_SIZE);
        let buffer = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        Self {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("batchnorm.timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: buffer(
                "batchnorm.timestamps.resolve",
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            readback: buffer(
                "batchnorm.timestamps.readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
        }
    }

    /// An empty compute pass that writes timestamp 0 at its start, or 1 at its end.
    fn mark(&self, encoder: &mut wgpu::CommandEncoder, end: bool) {
        let (label, at_begin, at_end) = if end {
            ("batchnorm.timestamp.end", None, Some(1))
        } else {
            ("batchnorm.timestamp.begin", Some(0), None)
        };
        drop(encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &self.set,
                beginning_of_pass_write_index: at_begin,
                end_of_pass_write_index: at_end,
            }),
        }));
    }
}

/// The timing state of one submit, held (locked) from recording to readback.
pub(crate) struct SubmitTimer<'a> {
    state: MutexGuard<'a, TimingState>,
}

impl SubmitTimer<'_> {
    fn queries(&self) -> &TimestampQueries {
        self.state
            .queries
            .as_ref()
            .expect("a SubmitTimer exists only while timing is on")
    }

    /// Records the first timestamp; call before the submit's passes.
    pub fn begin(&self, encoder: &mut wgpu::CommandEncoder) {
        self.queries().mark(encoder, false);
    }

    /// Records the second timestamp and the resolve; call after the passes.
    pub fn end(&self, encoder: &mut wgpu::CommandEncoder) {
        let q = self.queries();
        q.mark(encoder, true);
        encoder.resolve_query_set(&q.set, 0..2, &q.resolve, 0);
        encoder.copy_buffer_to_buffer(&q.resolve, 0, &q.readback, 0, q.resolve.size());
    }

    /// Reads the timestamps back (after the submit's wait) and stores the time.
    pub fn finish(mut self, handle: &DeviceHandle) -> Result<()> {
        self.state.last = None;
        let q = self.queries();
        let bytes = handle.map_read(&q.readback, q.readback.size())?;
        let stamps: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        if let [start, end] = stamps[..]
            && end > start
        {
            let period_ns = f64::from(handle.queue.get_timestamp_period());
            self.state.last = Some(Duration::from_secs_f64(
                (end - start) as f64 * period_ns * 1e-9,
            ));
        }
        Ok(())
    }
}

impl Timing {
    fn lock(&self) -> MutexGuard<'_, TimingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The timer of a submit, when timing is on.
    pub fn submit_timer(&self) -> Option<SubmitTimer<'_>> {
        let state = self.lock();
        state.queries.is_some().then_some(SubmitTimer { state })
    }

    /// Turns timing on (creating the query set on `device`) or off; either
    /// forgets the last time.
    pub fn set(&self, device: &wgpu::Device, on: bool) -> Result<()> {
        let mut state = self.lock();
        state.last = None;
        if !on {
            state.queries = None;
        } else if state.queries.is_none() {
            let scope = ErrorScopes::push(device);
            let queries = TimestampQueries::new(device);
            scope.pop("timestamp query set creation")?;
            state.queries = Some(queries);
        }
        Ok(())
    }

    /// Whether timing is on.
    pub fn enabled(&self) -> bool {
        self.lock().queries.is_some()
    }

    /// GPU time of the last timed submit.
    pub fn last(&self) -> Option<Duration> {
        self.lock().last
    }
}
