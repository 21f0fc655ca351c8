//! What a layer builds once and reuses on every later call: the uniform
//! blocks of the shapes it has seen and the bind groups of the buffers it has
//! been given. After the first call with a given set of buffers and shape,
//! recording finds everything here and creates nothing.

use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::device::ErrorScopes;
use crate::gpu::kernels::{Kernel, Params};
use std::collections::HashMap;
use wgpu::util::DeviceExt;

/// Entries kept before the cache starts over (an app that feeds ever new
/// buffers would otherwise keep them all alive).
const MAX_BIND_GROUPS: usize = 1024;
const MAX_PARAMS: usize = 256;

/// GPU objects a layer has created since it was made. Constant from call to
/// call once a layer has seen its shapes and buffers: the evidence that the
/// recording path allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuResourceCounts {
    /// Buffers (state, scratch, uniform blocks, and the outputs of the `run_*` methods).
    pub buffers: u64,
    /// Bind groups.
    pub bind_groups: u64,
}

/// One binding of a bind group, as a cache key: buffer, offset, size.
type SlotKey = (wgpu::Buffer, u64, u64);

#[derive(Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    /// The kernel, by address (kernels live as long as their context).
    kernel: usize,
    slots: Vec<SlotKey>,
}

/// Uniform blocks by contents, bind groups by kernel and bindings.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    params: HashMap<[u32; 24], wgpu::Buffer>,
    groups: HashMap<GroupKey, wgpu::BindGroup>,
    pub counts: GpuResourceCounts,
}

impl Cache {
    /// The uniform buffer holding `p`, made on first use.
    pub fn params(&mut self, ctx: &GpuContext, p: &Params) -> Result<wgpu::Buffer> {
        if let Some(b) = self.params.get(&p.key()) {
            return Ok(b.clone());
        }
        if self.params.len() >= MAX_PARAMS {
            self.params.clear();
            self.groups.clear();
        }
        let scope = ErrorScopes::push(ctx.device());
        let buffer = ctx
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("batchnorm.params"),
                contents: bytemuck::bytes_of(p),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        scope.pop("creating a uniform block")?;
        self.counts.buffers += 1;
        self.params.insert(p.key(), buffer.clone());
        Ok(buffer)
    }

    /// The bind group of `kernel` over `bindings` (in binding order), made on
    /// first use; wgpu's validation errors (a buffer of another device, a
    /// missing usage) come back as `Err`.
    pub fn group(
        &mut self,
        ctx: &GpuContext,
        kernel: &Kernel,
        bindings: &[wgpu::BufferBinding<'_>],
    ) -> Result<wgpu::BindGroup> {
        let key = GroupKey {
            kernel: std::ptr::from_ref(kernel) as usize,
            slots: bindings
                .iter()
                .map(|b| (b.buffer.clone(), b.offset, b.size.map_or(0, |s| s.get())))
                .collect(),
        };
        if let Some(g) = self.groups.get(&key) {
            return Ok(g.clone());
        }
        if self.groups.len() >= MAX_BIND_GROUPS {
            self.groups.clear();
        }
        let resources: Vec<wgpu::BindingResource<'_>> = bindings
            .iter()
            .map(|b| wgpu::BindingResource::Buffer(b.clone()))
            .collect();
        let scope = ErrorScopes::push(ctx.device());
        let group = kernel.bind_resources(ctx.device(), &resources);
        scope.pop(&format!("binding the buffers of {}", kernel.label))?;
        self.counts.bind_groups += 1;
        self.groups.insert(key, group.clone());
        Ok(group)
    }

    /// Forgets the bind groups that hold `buffer` (after it was replaced);
    /// the others stay, so that a call that grows the scratch buffer does
    /// not make the bind groups of other passes anew on the next call.
    pub fn forget_groups_of(&mut self, buffer: &wgpu::Buffer) {
        self.groups
            .retain(|key, _| key.slots.iter().all(|(b, _, _)| b != buffer));
    }
}
