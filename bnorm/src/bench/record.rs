//! One record per measurement, the GPU/CPU ratios between them, and their
//! JSON form (`--json`).

use super::OutputError;
use serde::Serialize;

/// One measurement, as `--json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// `train_forward`, `eval_forward` or `backward`; with `--op fused`
    /// `fused_*` and `unfused_*` of those.
    pub op: &'static str,
    /// `cpu`, or the adapter's backend (`vulkan`, `gl`, `metal`, `dx12`).
    pub backend: String,
    /// CPU model and threads, or the adapter name.
    pub device: String,
    /// Logical shape `NxCx...`.
    pub shape: String,
    /// `NCHW` or `NHWC`.
    pub layout: &'static str,
    /// `f32` or `f16`.
    pub dtype: &'static str,
    /// Elements of the tensor.
    pub elements: usize,
    /// Timed runs.
    pub repeat: u32,
    /// Median seconds of one operation.
    pub median_s: f64,
    /// GB/s (1e9 bytes/s) of the ideal traffic.
    pub gbps: f64,
    /// GB/s of the copy on the same device, timed the same way.
    pub copy_gbps: f64,
    /// `gbps / copy_gbps`.
    pub fraction_of_copy: f64,
    /// GPU records: `timestamp` (GPU time between timestamp queries around the
    /// passes) or `wall` (host clock around submit and wait).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_time_source: Option<&'static str>,
    /// GPU records: CPU time over GPU time for the same op, shape, layout and dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_over_cpu: Option<f64>,
    /// `--op fused` records: what follows the BatchNorm (`relu`, `add`,
    /// `add_relu`); both variants count the fused op's traffic floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fusion: Option<&'static str>,
    /// `fused_*` records: the unfused variant's time over the fused one's,
    /// same device, case and time source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_speedup: Option<f64>,
}

/// Fills `gpu_over_cpu` of GPU records from the CPU record of the same case.
pub fn fill_ratios(records: &mut [Record]) {
    let cpu: Vec<Record> = records
        .iter()
        .filter(|r| r.gpu_time_source.is_none())
        .cloned()
        .collect();
    for r in records.iter_mut().filter(|r| r.gpu_time_source.is_some()) {
        r.gpu_over_cpu = cpu
            .iter()
            .find(|c| {
                c.op == r.op && c.shape == r.shape && c.layout == r.layout && c.dtype == r.dtype
            })
            .map(|c| c.median_s / r.median_s);
    }
}

/// Fills `fused_speedup` of `fused_*` records from the `unfused_*` record of
/// the same case, backend, device and time source.
pub fn fill_speedups(records: &mut [Record]) {
    let unfused: Vec<Record> = records
        .iter()
        .filter(|r| r.op.starts_with("unfused_"))
        .cloned()
        .collect();
    for r in records.iter_mut() {
        let Some(op) = r.op.strip_prefix("fused_") else {
            continue;
        };
        r.fused_speedup = unfused
            .iter()
            .find(|u| {
                u.op.strip_prefix("unfused_") == Some(op)
                    && (&u.backend, &u.device, &u.shape) == (&r.backend, &r.device, &r.shape)
                    && (u.layout, u.dtype, u.gpu_time_source, u.fusion)
                        == (r.layout, r.dtype, r.gpu_time_source, r.fusion)
            })
            .map(|u| u.median_s / r.median_s);
    }
}

/// The records as a pretty-printed JSON array.
///
/// # Errors
/// When serialization fails.
pub fn to_json(records: &[Record]) -> Result<String, OutputError> {
    serde_json::to_string_pretty(records)
        .map(|s| s + "\n")
        .map_err(|e| OutputError {
            path: "(json)".into(),
            message: e.to_string(),
        })
}

/// A record of the shape 8x64x32x32 on device `d`, for the tests.
#[cfg(test)]
pub fn sample(
    op: &'static str,
    backend: &str,
    source: Option<&'static str>,
    median_s: f64,
) -> Record {
    Record {
        op,
        backend: backend.into(),
        device: "d".into(),
        shape: "8x64x32x32".into(),
        layout: "NCHW",
        dtype: "f32",
        elements: 8 * 64 * 32 * 32,
        repeat: 3,
        median_s,
        gbps: 1.0,
        copy_gbps: 2.0,
        fraction_of_copy: 0.5,
        gpu_time_source: source,
        gpu_over_cpu: None,
        fusion: None,
        fused_speedup: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_gpu_records_with_the_cpu_record_of_the_same_case() {
        let mut r = vec![
            sample("train_forward", "cpu", None, 4.0),
            sample("train_forward", "vulkan", Some("timestamp"), 1.0),
            sample("backward", "vulkan", Some("wall"), 2.0),
        ];
        fill_ratios(&mut r);
        assert_eq!(r[0].gpu_over_cpu, None);
        assert_eq!(r[1].gpu_over_cpu, Some(4.0));
        assert_eq!(r[2].gpu_over_cpu, None, "no CPU backward measured");
    }

    #[test]
    fn speedups_pair_fused_records_with_their_unfused_twin() {
        let mut r = vec![
            sample("fused_backward", "vulkan", Some("wall"), 1.0),
            sample("unfused_backward", "vulkan", Some("wall"), 1.5),
            sample("fused_backward", "vulkan", Some("timestamp"), 1.0),
            sample("unfused_train_forward", "vulkan", Some("timestamp"), 3.0),
        ];
        for x in &mut r {
            x.fusion = Some("add_relu");
        }
        fill_speedups(&mut r);
        assert_eq!(r[0].fused_speedup, Some(1.5));
        assert_eq!(r[1].fused_speedup, None);
        assert_eq!(
            r[2].fused_speedup, None,
            "no unfused backward timed by timestamps"
        );
        let v: serde_json::Value = serde_json::from_str(&to_json(&r).unwrap()).unwrap();
        assert_eq!(v[0]["fusion"], "add_relu");
        assert_eq!(v[0]["fused_speedup"], 1.5);
        assert!(v[1].get("fused_speedup").is_none());
    }

    #[test]
    fn json_has_the_documented_fields() {
        let mut r = vec![
            sample("eval_forward", "cpu", None, 1.0),
            sample("eval_forward", "gl", Some("wall"), 0.5),
        ];
        fill_ratios(&mut r);
        let v: serde_json::Value = serde_json::from_str(&to_json(&r).unwrap()).unwrap();
        let cpu = &v[0];
        for k in [
            "op",
            "backend",
            "device",
            "shape",
            "layout",
            "dtype",
            "median_s",
            "gbps",
            "copy_gbps",
            "fraction_of_copy",
        ] {
            assert!(cpu.get(k).is_some(), "missing {k}");
        }
        assert!(cpu.get("gpu_time_source").is_none());
        assert_eq!(v[1]["gpu_time_source"], "wall");
        assert_eq!(v[1]["gpu_over_cpu"], 2.0);
    }
}
