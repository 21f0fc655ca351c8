//! The upstream gradient the backward's reductions sum: `dy` as given, or,
//! for a fused backward, `dy` gated by the fused forward's output and
//! written out (as `dz`, or as scratch in `dx`) in the same pass, one span
//! at a time while the span is in cache. The `dx` pass then reads the gated
//! gradient from there, so the fused backward of a ReLU reads `x`, `dy` and
//! `y` once and writes the gated `dy` once before the usual `dx` pass
//! ([`crate::FusedOp::ideal_bytes_per_element`]: 28 bytes per `f32` element).

use super::elem::CpuElement;
use super::lanes::{Lanes, add_grad, add_grad_gated};
use crate::fused::Activation;
use std::marker::PhantomData;

/// The gradient the reductions sum, handed out span by span ([`GradIn::span`]).
pub(super) struct GradIn<'a, E> {
    dy: &'a [E],
    /// The fused forward's output, for the ReLU's mask; `None`: no gating.
    mask: Option<&'a [E]>,
    /// Where the (gated) gradient is written as it is read; `None`: nowhere,
    /// the spans are those of `dy`.
    out: Option<Out<'a, E>>,
}

/// A tensor that concurrent tasks write in disjoint spans.
pub(super) struct Out<'a, E> {
    ptr: *mut E,
    len: usize,
    _tensor: PhantomData<&'a mut [E]>,
}

// SAFETY: `Out` is a `&mut [E]` whose spans are handed to concurrent tasks
// by `GradIn::span`, whose contract keeps them disjoint.
unsafe impl<E: Send> Send for Out<'_, E> {}
// SAFETY: as for `Send`: no span is reachable from two tasks.
unsafe impl<E: Send> Sync for Out<'_, E> {}

impl<'a, E: CpuElement> GradIn<'a, E> {
    /// `dy` as given (the plain backward).
    pub(super) fn plain(dy: &'a [E]) -> Self {
        Self {
            dy,
            mask: None,
            out: None,
        }
    }

    /// `dy` let through by `activation` at the fused forward's output `y`
    /// ([`Activation::gate`]), written into `out` (as long as `dy`) as the
    /// reductions read it.
    pub(super) fn gated(dy: &'a [E], y: &'a [E], activation: Activation, out: &'a mut [E]) -> Self {
        assert_eq!(out.len(), dy.len(), "the gated gradient's tensor");
        assert_eq!(y.len(), dy.len(), "the fused forward's output");
        Self {
            dy,
            mask: (activation == Activation::Relu).then_some(y),
            out: Some(Out::new(out)),
        }
    }

    /// Elements `start..start + len` of the gradient: those of `dy`, or,
    /// when gated, those of `dy` gated and stored into the output tensor,
    /// which the span then views.
    ///
    /// Calls [`CpuElement::map`]: not to be called from inside a
    /// [`CpuElement::read`] or `map` closure.
    ///
    /// # Safety
    /// While the spans returned live, no element may be asked for twice:
    /// concurrent tasks ask for disjoint spans, and a task for each span once
    /// (the reductions' tasks partition the tensor into pieces, runs or rows,
    /// each visited once).
    pub(super) unsafe fn span(&self, start: usize, len: usize) -> &'a [E] {
        let dy = &self.dy[start..start + len];
        let Some(out) = &self.out else {
            return dy;
        };
        // SAFETY: the caller's contract.
        let o = unsafe { out.span(start, len) };
        match self.mask {
            Some(y) => gate_run(dy, &y[start..start + len], o),
            None => o.copy_from_slice(dy),
        }
        o
    }

    /// `s1 += sum(g)`, `s2 += sum(g * (x - center))` over the elements
    /// `start..start + x.len()` of the gradient `g`, as
    /// [`add_grad`] of [`GradIn::span`], the ReLU's gating and store in
    /// the same loop as the sums.
    ///
    /// # Safety
    /// As [`GradIn::span`].
    pub(super) unsafe fn add_sums(
        &self,
        (s1, s2): (&mut Lanes, &mut Lanes),
        x: &[E],
        start: usize,
        center: f32,
    ) {
        let len = x.len();
        match (&self.out, self.mask) {
            (Some(out), Some(y)) => {
                let span = start..start + len;
                // SAFETY: the caller's contract.
                let o = unsafe { out.span(start, len) };
                add_grad_gated(s1, s2, [x, &self.dy[span.clone()], &y[span]], o, center);
            }
            // SAFETY: the caller's contract.
            _ => add_grad(s1, s2, x, unsafe { self.span(start, len) }, center),
        }
    }
}

impl<'a, E> Out<'a, E> {
    /// The tensor `out`, borrowed for the spans' lifetime.
    pub(super) fn new(out: &'a mut [E]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            _tensor: PhantomData,
        }
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// No other reference to these elements may exist while the span lives.
    pub(super) unsafe fn span(&self, start: usize, len: usize) -> &'a mut [E] {
        assert!(start + len <= self.len, "span past the gradient's tensor");
        // SAFETY: in bounds (checked above) of the tensor `out` borrows
        // mutably for 'a; the caller keeps the span unaliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// `out = dy` where `y > 0` or `y` is NaN, `0` elsewhere (the ReLU's
/// [`Activation::gate`]); exact in either element type.
fn gate_run<E: CpuElement>(dy: &[E], y: &[E], out: &mut [E]) {
    E::map(&[dy, y], out, |_, v, o| gate_f32(o, v[0], v[1]));
}

#[inline(never)]
#[allow(clippy::needless_range_loop)]
fn gate_f32(out: &mut [f32], dy: &[f32], y: &[f32]) {
    let n = out.len();
    let (dy, y) = (&dy[..n], &y[..n]);
    for j in 0..n {
        out[j] = Activation::Relu.gate(y[j], dy[j]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn spans_gate_and_write_through() {
        let dy = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let y = [0.5f32, 0.0, -1.0, f32::NAN, -0.0];
        let mut out = [9.0f32; 5];
        let g = GradIn::gated(&dy, &y, Activation::Relu, &mut out);
        // SAFETY: disjoint spans, each once.
        let (a, b) = unsafe { (g.span(0, 2), g.span(2, 3)) };
        assert_eq!((a, b), (&[1.0, 0.0][..], &[0.0, 4.0, 0.0][..]));
        assert_eq!(out, [1.0, 0.0, 0.0, 4.0, 0.0]);

        let mut copy = [0.0f32; 5];
        let g = GradIn::gated(&dy, &y, Activation::Identity, &mut copy);
        // SAFETY: one span.
        assert_eq!(unsafe { g.span(1, 3) }, &[2.0, 3.0, 4.0][..]);
        assert_eq!(copy, [0.0, 2.0, 3.0, 4.0, 0.0]);

        let h = |v: &[f32]| v.iter().map(|&a| f16::from_f32(a)).collect::<Vec<_>>();
        let (dy16, y16) = (h(&dy), h(&y));
        let mut out16 = h(&[7.0; 5]);
        let g = GradIn::gated(&dy16, &y16, Activation::Relu, &mut out16);
        // SAFETY: one span.
        let s = unsafe { g.span(0, 5) };
        assert_eq!(s, &h(&[1.0, 0.0, 0.0, 4.0, 0.0])[..]);
        assert_eq!(unsafe { GradIn::plain(&dy16).span(3, 2) }, &dy16[3..]);
    }
}
