//! The unfused ResNet tail that `bnorm bench --op fused` sets the fused
//! BatchNorm against: after the plain BatchNorm, the residual add and the
//! ReLU as separate passes, in place on its output (torchvision's
//! `out += identity; out = relu(out)`), and before the plain backward the
//! ReLU's backward (`threshold_backward`) as its own pass. The add's backward
//! moves nothing (both inputs take the same gradient).
//!
//! On GPUs these are the tool's own kernels (`bnorm/shaders/unfused.wgsl`),
//! recorded into the same encoder as the library's passes, as an app would
//! record its own; on the CPU, rayon over blocks through the backend's
//! element conversions.

use rayon::prelude::*;
use wgpu_batchnorm::cpu::CpuElement;
use wgpu_batchnorm::shaders::{COMMON, CONSTANTS, Storage, WG};
use wgpu_batchnorm::wgpu;
use wgpu_batchnorm::{Activation, DType, Error, GpuContext, GpuTensor, Result};

/// The kernels' source file, after the library's prelude, constants and common part.
const SOURCE: &str = include_str!("../../shaders/unfused.wgsl");

/// Elements per rayon task of the CPU passes.
const CPU_BLOCK: usize = 1 << 15;

/// One entry point of `unfused.wgsl`.
struct Pass {
    pipeline: wgpu::ComputePipeline,
    label: &'static str,
}

/// The unfused passes on one adapter, for tensors of one storage type.
pub struct GpuUnfused {
    ctx: GpuContext,
    add: Pass,
    relu: Pass,
    relu_backward: Pass,
}

impl GpuUnfused {
    /// Compiles the three passes for `dtype` storage on `ctx`, f16 as the
    /// library's kernels hold it there ([`Storage::f16_on`]).
    ///
    /// # Errors
    /// [`Error::Wgpu`] when the shader does not compile on the adapter.
    pub fn new(ctx: &GpuContext, dtype: DType) -> Result<Self> {
        let prelude = match dtype {
            DType::F32 => Storage::F32.prelude(),
            DType::F16 => Storage::f16_on(ctx.features()).prelude(),
        };
        let device = ctx.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("bnorm.unfused"),
            source: wgpu::ShaderSource::Wgsl(
                format!("{prelude}{CONSTANTS}{COMMON}{SOURCE}").into(),
            ),
        });
        let pass = |label: &'static str| Pass {
            pipeline: device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some(label),
                compilation_options: Default::default(),
                cache: None,
            }),
            label,
        };
        let kernels = Self {
            ctx: ctx.clone(),
            add: pass("add_inplace"),
            relu: pass("relu_inplace"),
            relu_backward: pass("relu_backward"),
        };
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(Error::Wgpu {
                during: "compiling the unfused comparison kernels".into(),
                message: e.to_string(),
            }),
            None => Ok(kernels),
        }
    }

    /// Records `y += z` (the residual add, in place).
    ///
    /// # Errors
    /// As [`GpuUnfused::record`].
    pub fn record_add(
        &self,
        enc: &mut wgpu::CommandEncoder,
        z: &GpuTensor,
        y: &GpuTensor,
    ) -> Result<()> {
        self.record(enc, &self.add, &[(0, z), (1, y)])
    }

    /// Records `y = relu(y)` in place.
    ///
    /// # Errors
    /// As [`GpuUnfused::record`].
    pub fn record_relu(&self, enc: &mut wgpu::CommandEncoder, y: &GpuTensor) -> Result<()> {
        self.record(enc, &self.relu, &[(1, y)])
    }

    /// Records `g = dy` where `y > 0` (or NaN), else 0.
    ///
    /// # Errors
    /// As [`GpuUnfused::record`].
    pub fn record_relu_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        y: &GpuTensor,
        dy: &GpuTensor,
        g: &GpuTensor,
    ) -> Result<()> {
        self.record(enc, &self.relu_backward, &[(0, y), (1, g), (2, dy)])
    }

    /// Records `pass` over the tensors bound at their bindings (the first
    /// bound tensor gives the length), one vec4 per thread on a grid folded
    /// into 2-D past the adapter's per-dimension limit.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the tensors' length is not a multiple of 4,
    /// [`Error::ShapeMismatch`] when their shapes or dtypes differ.
    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pass: &Pass,
        bound: &[(u32, &GpuTensor)],
    ) -> Result<()> {
        let first = bound[0].1;
        if let Some((_, t)) = bound
            .iter()
            .find(|(_, t)| t.shape() != first.shape() || t.dtype() != first.dtype())
        {
            return Err(Error::ShapeMismatch {
                what: format!("{} operand ({})", pass.label, t.dtype()),
                expected: first.shape().to_vec(),
                got: t.shape().to_vec(),
            });
        }
        if !first.len().is_multiple_of(4) {
            return Err(Error::Unsupported {
                adapter: self.ctx.name().to_string(),
                what: format!(
                    "unfused comparison kernels on {} elements (whole vec4s only)",
                    first.len()
                ),
            });
        }
        let entries: Vec<wgpu::BindGroupEntry<'_>> = bound
            .iter()
            .map(|&(binding, t)| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(t.binding()),
            })
            .collect();
        let group = self
            .ctx
            .device()
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(pass.label),
                layout: &pass.pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        let groups = u32::try_from((first.len() / 4).div_ceil(WG as usize)).map_err(|_| {
            Error::Unsupported {
                adapter: self.ctx.name().to_string(),
                what: "an unfused comparison this large".into(),
            }
        })?;
        let max = self
            .ctx
            .limits()
            .max_compute_workgroups_per_dimension
            .max(1);
        let (gx, gy) = if groups <= max {
            (groups, 1)
        } else {
            (max, groups.div_ceil(max))
        };
        let mut cpass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(pass.label),
            timestamp_writes: None,
        });
        cpass.set_pipeline(&pass.pipeline);
        cpass.set_bind_group(0, &group, &[]);
        cpass.dispatch_workgroups(gx, gy, 1);
        Ok(())
    }
}

/// `out = act(y + z)` (or `act(y)` without `z`) on the CPU, as separate
/// passes: the add, then the activation in place on `out`.
pub fn cpu_tail<E: CpuElement>(y: &[E], z: Option<&[E]>, act: Activation, out: &mut [E]) {
    match z {
        Some(z) => map2(y, z, out, |a, b| a + b),
        None => map2(y, y, out, |a, _| a),
    }
    if act == Activation::Relu {
        out.par_chunks_mut(CPU_BLOCK).for_each(|o| {
            for v in o {
                *v = E::store(act.apply(v.load()));
            }
        });
    }
}

/// `g = gate(y, dy)`: the ReLU's backward pass on the CPU.
pub fn cpu_gate<E: CpuElement>(y: &[E], dy: &[E], act: Activation, g: &mut [E]) {
    map2(y, dy, g, |y, dy| act.gate(y, dy));
}

/// `out[i] = f(a[i], b[i])` in parallel blocks, through the element
/// conversions of the CPU backend.
fn map2<E: CpuElement>(a: &[E], b: &[E], out: &mut [E], f: impl Fn(f32, f32) -> f32 + Sync) {
    out.par_chunks_mut(CPU_BLOCK)
        .zip(a.par_chunks(CPU_BLOCK).zip(b.par_chunks(CPU_BLOCK)))
        .for_each(|(o, (a, b))| {
            E::map(&[a, b], o, |_, ins, out| {
                for ((o, &a), &b) in out.iter_mut().zip(ins[0]).zip(ins[1]) {
                    *o = f(a, b);
                }
            });
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu_batchnorm::{AdapterSelection, Layout};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 17) as f32 - 8.0)
            .collect()
    }

    #[test]
    fn cpu_passes_add_activate_and_gate() {
        let (y, z) = (values(100_000, 1), values(100_000, 2));
        let mut out = vec![0.0f32; y.len()];
        cpu_tail(&y, Some(&z), Activation::Relu, &mut out);
        for i in 0..y.len() {
            assert_eq!(out[i], (y[i] + z[i]).max(0.0), "{i}");
        }
        let mut g = vec![0.0f32; y.len()];
        cpu_gate(&out, &z, Activation::Relu, &mut g);
        for i in 0..y.len() {
            assert_eq!(g[i], if out[i] > 0.0 { z[i] } else { 0.0 }, "{i}");
        }
    }

    /// The GPU passes on every adapter, against the host (exact: small integers).
    #[test]
    fn gpu_passes_match_the_host_on_every_adapter() {
        let ctxs = GpuContext::all(&AdapterSelection::from_env()).unwrap_or_default();
        let required = ["CI", "BNORM_REQUIRE_GPU"]
            .iter()
            .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false"));
        assert!(!(ctxs.is_empty() && required), "a GPU adapter is required");
        let dims = [6, 4, 8, 8];
        let n: usize = dims.iter().product();
        let (y0, z, dy) = (values(n, 1), values(n, 2), values(n, 3));
        let mut want = vec![0.0f32; n];
        cpu_tail(&y0, Some(&z), Activation::Relu, &mut want);
        let mut want_g = vec![0.0f32; n];
        cpu_gate(&want, &dy, Activation::Relu, &mut want_g);
        // small integers: exact in f16 too (packed words where the adapter lacks SHADER_F16)
        for (ctx, dtype) in ctxs.iter().flat_map(|c| [(c, DType::F32), (c, DType::F16)]) {
            let k = GpuUnfused::new(ctx, dtype).unwrap();
            let t = |v: &[f32]| {
                GpuTensor::from_slice_as(ctx, v, &dims, Layout::ChannelsFirst, dtype).unwrap()
            };
            let (y, z, dy, g) = (t(&y0), t(&z), t(&dy), t(&y0));
            ctx.run("unfused test", |enc| {
                k.record_add(enc, &z, &y)?;
                k.record_relu(enc, &y)?;
                k.record_relu_backward(enc, &y, &dy, &g)
            })
            .unwrap();
            assert_eq!(y.to_vec().unwrap(), want, "{} {dtype}", ctx.label());
            assert_eq!(g.to_vec().unwrap(), want_g, "{} {dtype}", ctx.label());
            let odd =
                GpuTensor::from_slice(ctx, &[1.0; 6], &[2, 3], Layout::ChannelsFirst).unwrap();
            let err = ctx.run("odd", |enc| k.record_relu(enc, &odd)).unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        }
    }
}
