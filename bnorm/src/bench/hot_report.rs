//! What `bnorm bench --hot-path` reports: one record per measurement, the
//! table on stdout, the conclusions under it, and the `--json` document.

use super::OutputError;
use super::table::{human_time, render};
use serde::Serialize;
use std::fmt::Write as _;
use wgpu_batchnorm::GpuResourceCounts;

/// One empty command buffer submitted, then a wait for the device (raw wgpu).
pub const EMPTY_SUBMIT: &str = "empty_submit";
/// `GpuContext::run` recording nothing: the same, plus its error scope and lock.
pub const EMPTY_RUN: &str = "empty_run";
/// Recording one training forward and its backward into an encoder.
pub const RECORD: &str = "record_train_backward";
/// The same and `CommandEncoder::finish`, where wgpu encodes the passes.
pub const RECORD_FINISH: &str = "record_train_backward_finish";
/// Phases of [`ONE_SUBMIT`]: recording the layers' training forwards,
pub const LAYERS_RECORD: &str = "layers_record";
/// `CommandEncoder::finish`,
pub const LAYERS_FINISH: &str = "layers_finish";
/// `Queue::submit`,
pub const LAYERS_SUBMIT: &str = "layers_submit";
/// and `Device::poll` until the work is done.
pub const LAYERS_WAIT: &str = "layers_wait";
/// The layers' training forwards recorded into one encoder, one submit and
/// wait (from creating the encoder to the end of the wait).
pub const ONE_SUBMIT: &str = "layers_one_submit";
/// The layers' training forwards as blocking calls, one submit and wait each.
pub const BLOCKING: &str = "layers_blocking";

/// Buffers and bind groups created, as [`GpuResourceCounts`] (summed over layers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// Buffers.
    pub buffers: u64,
    /// Bind groups.
    pub bind_groups: u64,
}

impl Resources {
    /// The sum of `counts`.
    pub fn sum(counts: impl IntoIterator<Item = GpuResourceCounts>) -> Self {
        counts.into_iter().fold(Self::default(), |a, c| Self {
            buffers: a.buffers + c.buffers,
            bind_groups: a.bind_groups + c.bind_groups,
        })
    }
}

/// One measurement of `--hot-path`, as `--json` writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HotRecord {
    /// One of `empty_submit`, `empty_run`, `record_train_backward`,
    /// `record_train_backward_finish`, `layers_record`, `layers_finish`,
    /// `layers_submit`, `layers_wait`, `layers_one_submit`, `layers_blocking`.
    pub measurement: &'static str,
    /// The adapter's backend (`vulkan`, `gl`, `metal`, `dx12`).
    pub backend: String,
    /// The adapter name.
    pub device: String,
    /// Logical shape `NxCx...` (absent for the empty submits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
    /// `NCHW` or `NHWC` (absent for the empty submits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<&'static str>,
    /// `f32` or `f16` (absent for the empty submits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<&'static str>,
    /// Layer calls in one timed run (1, or `--layers`).
    pub calls: u32,
    /// Timed runs.
    pub repeat: u32,
    /// Median seconds of one timed run (all its calls).
    pub median_s: f64,
    /// `median_s / calls`.
    pub per_call_s: f64,
    /// Buffers and bind groups of the layers after their first call, before the timed runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources_before: Option<Resources>,
    /// The same after the warm-up and timed runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources_after: Option<Resources>,
}

impl HotRecord {
    /// `resources_after - resources_before`, when counted.
    pub fn new_resources(&self) -> Option<(i128, i128)> {
        let (b, a) = (self.resources_before?, self.resources_after?);
        Some((
            i128::from(a.buffers) - i128::from(b.buffers),
            i128::from(a.bind_groups) - i128::from(b.bind_groups),
        ))
    }

    fn label(&self) -> String {
        let layers = self.calls;
        match self.measurement {
            EMPTY_SUBMIT => "empty submit + wait".into(),
            EMPTY_RUN => "empty GpuContext::run".into(),
            RECORD => "record train fwd + backward".into(),
            RECORD_FINISH => "record ... + encoder.finish()".into(),
            LAYERS_RECORD => format!("{layers} train fwd: recording"),
            LAYERS_FINISH => format!("{layers} train fwd: finish"),
            LAYERS_SUBMIT => format!("{layers} train fwd: submit"),
            LAYERS_WAIT => format!("{layers} train fwd: wait"),
            ONE_SUBMIT => format!("{layers} train fwd: one submit"),
            BLOCKING => format!("{layers} train fwd: {layers} blocking"),
            other => other.into(),
        }
    }
}

/// The table on screen: a row per record.
pub fn table(records: &[HotRecord]) -> String {
    let head = [
        "measurement",
        "shape",
        "backend",
        "device",
        "calls",
        "median",
        "per call",
        "new buffers",
        "new bind groups",
    ];
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let new = r.new_resources();
            vec![
                r.label(),
                r.shape.clone().unwrap_or_else(|| "-".into()),
                r.backend.clone(),
                r.device.clone(),
                r.calls.to_string(),
                human_time(r.median_s),
                human_time(r.per_call_s),
                new.map_or("-".into(), |n| n.0.to_string()),
                new.map_or("-".into(), |n| n.1.to_string()),
            ]
        })
        .collect();
    render(&head, &rows, 4)
}

/// The record of `measurement` on `backend`/`device` and `shape` (None: the floor).
fn find<'a>(
    records: &'a [HotRecord],
    measurement: &str,
    (backend, device): (&str, &str),
    shape: Option<&str>,
) -> Option<&'a HotRecord> {
    records.iter().find(|r| {
        r.measurement == measurement
            && r.backend == backend
            && r.device == device
            && r.shape.as_deref() == shape
    })
}

/// What the numbers say, a paragraph per adapter and shape: blocking calls
/// against one submission, and the host's part of a layer against the floor.
pub fn conclusions(records: &[HotRecord]) -> String {
    let mut out = String::new();
    for one in records.iter().filter(|r| r.measurement == ONE_SUBMIT) {
        let key = (one.backend.as_str(), one.device.as_str());
        let shape = one.shape.as_deref();
        let n = one.calls;
        let floor = find(records, EMPTY_SUBMIT, key, None).map(|f| f.median_s);
        let _ = write!(
            out,
            "{}:{} {}: {n} training forwards in one submission {} ({} a layer)",
            one.backend,
            one.device,
            shape.unwrap_or("-"),
            human_time(one.median_s),
            human_time(one.per_call_s)
        );
        if let Some(b) = find(records, BLOCKING, key, shape) {
            let more = b.per_call_s - one.per_call_s;
            let _ = write!(
                out,
                "; as {n} blocking calls {} ({} a layer): {:.2}x the time, {}{} a layer",
                human_time(b.median_s),
                human_time(b.per_call_s),
                b.median_s / one.median_s,
                human_time(more.abs()),
                if more >= 0.0 { " more" } else { " less" },
            );
        }
        out.push_str(".\n");
        let of_floor = |t: f64| {
            floor.map_or(String::new(), |f| {
                format!(
                    ", {:.3}x the floor (one empty submit + wait, {})",
                    t / f,
                    human_time(f)
                )
            })
        };
        let phase = |m| find(records, m, key, shape).map(|r| r.per_call_s);
        if let [Some(record), Some(finish), Some(submit), Some(wait)] =
            [LAYERS_RECORD, LAYERS_FINISH, LAYERS_SUBMIT, LAYERS_WAIT].map(phase)
        {
            let encode = record + finish;
            let _ = writeln!(
                out,
                "  A layer of the one submission: recording {} + finish {} = {} of host time to encode{}; then submit {}, wait {}.",
                human_time(record),
                human_time(finish),
                human_time(encode),
                of_floor(encode),
                human_time(submit),
                human_time(wait),
            );
        }
        if let Some(r) = find(records, RECORD_FINISH, key, shape) {
            let _ = writeln!(
                out,
                "  Recording a training forward + backward, with encoder.finish(): {}{}.",
                human_time(r.median_s),
                of_floor(r.median_s),
            );
        }
    }
    out
}

/// The `--json` document of `--hot-path`: `{"hot_path": [records]}`.
///
/// # Errors
/// When serialization fails.
pub fn to_json(records: &[HotRecord]) -> Result<String, OutputError> {
    #[derive(Serialize)]
    struct Document<'a> {
        hot_path: &'a [HotRecord],
    }
    serde_json::to_string_pretty(&Document { hot_path: records })
        .map(|s| s + "\n")
        .map_err(|e| OutputError {
            path: "(json)".into(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(measurement: &'static str, shape: Option<&str>, calls: u32, median_s: f64) -> HotRecord {
        let counted = [RECORD, ONE_SUBMIT, BLOCKING].contains(&measurement);
        HotRecord {
            measurement,
            backend: "vulkan".into(),
            device: "d".into(),
            shape: shape.map(Into::into),
            layout: shape.map(|_| "NCHW"),
            dtype: shape.map(|_| "f32"),
            calls,
            repeat: 3,
            median_s,
            per_call_s: median_s / f64::from(calls),
            resources_before: counted.then_some(Resources {
                buffers: 5,
                bind_groups: 6,
            }),
            resources_after: counted.then_some(Resources {
                buffers: 5,
                bind_groups: 6,
            }),
        }
    }

    fn sample() -> Vec<HotRecord> {
        let s = Some("32x64");
        vec![
            rec(EMPTY_SUBMIT, None, 1, 1e-3),
            rec(EMPTY_RUN, None, 1, 1.1e-3),
            rec(RECORD, s, 1, 50e-6),
            rec(RECORD_FINISH, s, 1, 80e-6),
            rec(LAYERS_RECORD, s, 50, 1e-3),
            rec(LAYERS_FINISH, s, 50, 0.5e-3),
            rec(LAYERS_SUBMIT, s, 50, 0.2e-3),
            rec(LAYERS_WAIT, s, 50, 0.098),
            rec(ONE_SUBMIT, s, 50, 0.1),
            rec(BLOCKING, s, 50, 0.2),
        ]
    }

    #[test]
    fn table_has_a_row_per_measurement_and_the_new_resources() {
        let t = table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 12, "{t}");
        assert!(lines[0].contains("new bind groups"), "{t}");
        assert!(lines[2].starts_with("empty submit + wait "), "{t}");
        let record = lines[4];
        assert!(record.contains("50.0 us") && record.ends_with(" 0"), "{t}");
        assert!(lines[5].trim_end().ends_with(" -"), "{t}");
        assert!(lines[11].starts_with("50 train fwd: 50 blocking "), "{t}");
        assert!(lines[11].contains("4.000 ms"), "{t}");
    }

    #[test]
    fn conclusions_give_the_ratio_and_the_floor() {
        let c = conclusions(&sample());
        assert!(c.contains("as 50 blocking calls 200.000 ms"), "{c}");
        assert!(c.contains("2.00x the time, 2.000 ms more a layer"), "{c}");
        assert!(
            c.contains("finish 10.0 us = 30.0 us of host time to encode, 0.030x the floor"),
            "{c}"
        );
        assert!(c.contains("then submit 4.0 us, wait 1.960 ms."), "{c}");
        assert!(c.contains("finish(): 80.0 us, 0.080x the floor"), "{c}");
    }

    #[test]
    fn json_is_one_section_of_records() {
        let v: serde_json::Value = serde_json::from_str(&to_json(&sample()).unwrap()).unwrap();
        let r = v["hot_path"].as_array().unwrap();
        assert_eq!(r.len(), 10);
        assert!(r[0].get("shape").is_none());
        assert_eq!(r[2]["measurement"], RECORD);
        assert_eq!(r[2]["resources_after"]["bind_groups"], 6);
        assert!(r[3].get("resources_after").is_none());
        assert_eq!(r[9]["per_call_s"], 0.004);
    }
}
