//! The SVG chart of `--svg`: GB/s per shape, CPU vs GPU, copy rooflines dashed.

use super::OutputError;
use super::record::Record;
use std::path::Path;

/// A GB/s axis label without trailing zeros: `100`, `2.5`, `0.01`.
fn gbps_label(v: f64) -> String {
    let s = if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Draws GB/s per shape, one panel per op: a line per device (GPU time from
/// timestamps where measured, else wall clock) and its copy roofline dashed
/// in the same colour; log scale.
///
/// # Errors
/// When drawing or writing fails or there is nothing to draw.
pub fn write_svg(path: &Path, records: &[Record], title: &str) -> Result<(), OutputError> {
    use plotters::prelude::*;
    let out_err = |message: String| OutputError {
        path: path.display().to_string(),
        message,
    };
    // Keep, per device and case, the preferred time source.
    let preferred = |r: &Record| match r.gpu_time_source {
        None => true,
        Some("timestamp") => true,
        Some(_) => !records.iter().any(|o| {
            o.gpu_time_source == Some("timestamp")
                && o.device == r.device
                && o.backend == r.backend
                && o.op == r.op
                && o.shape == r.shape
        }),
    };
    let chosen: Vec<&Record> = records
        .iter()
        .filter(|r| preferred(r) && r.gbps.is_finite())
        .collect();
    if chosen.is_empty() {
        return Err(out_err("no measurement to draw".into()));
    }
    let mut shapes: Vec<String> = Vec::new();
    let mut ops: Vec<&'static str> = Vec::new();
    let mut series: Vec<(String, String)> = Vec::new(); // (backend, device)
    for r in &chosen {
        if !shapes.contains(&r.shape) {
            shapes.push(r.shape.clone());
        }
        if !ops.contains(&r.op) {
            ops.push(r.op);
        }
        let key = (r.backend.clone(), r.device.clone());
        if !series.contains(&key) {
            series.push(key);
        }
    }
    let values = chosen
        .iter()
        .flat_map(|r| [r.gbps, r.copy_gbps])
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    // Room above the lines for the legend (log scale: a decade and a half).
    let (lo, hi) = (lo / 2.0, hi * 30.0);
    let panel_h = 340u32;
    let root = SVGBackend::new(path, (1000, 60 + panel_h * ops.len() as u32)).into_drawing_area();
    let e = |x: &dyn std::fmt::Display| out_err(x.to_string());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, body) = root.split_vertically(60);
    top.titled(title, ("sans-serif", 18)).map_err(|x| e(&x))?;
    let panels = body.split_evenly((ops.len(), 1));
    let n = shapes.len() as i32;
    let label_of = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            shapes.get(*i as usize).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    for (panel, op) in panels.iter().zip(&ops) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{op}: GB/s of ideal traffic (dashed: copy on the same device)"),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d((0..(n - 1).max(1)).into_segmented(), (lo..hi).log_scale())
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_labels(shapes.len())
            .x_label_formatter(&label_of)
            .y_desc("GB/s")
            .y_label_formatter(&|v| gbps_label(*v))
            .draw()
            .map_err(|x| e(&x))?;
        for (k, (backend, device)) in series.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let pts: Vec<(i32, f64, f64)> = chosen
                .iter()
                .filter(|r| r.op == *op && &r.backend == backend && &r.device == device)
                .filter_map(|r| {
                    shapes
                        .iter()
                        .position(|s| *s == r.shape)
                        .map(|i| (i as i32, r.gbps, r.copy_gbps))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let source = chosen
                .iter()
                .find(|r| &r.backend == backend && &r.device == device)
                .and_then(|r| r.gpu_time_source)
                .map_or(String::new(), |s| format!(", {s} time"));
            let label = format!("{backend}: {device}{source}");
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|&(i, g, _)| (SegmentValue::CenterOf(i), g)),
                    color.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&(i, g, _)| {
                    Circle::new((SegmentValue::CenterOf(i), g), 3, color.filled())
                }))
                .map_err(|x| e(&x))?;
            let roof: Vec<(SegmentValue<i32>, f64)> = pts
                .iter()
                .filter(|p| p.2.is_finite())
                .map(|&(i, _, c)| (SegmentValue::CenterOf(i), c))
                .collect();
            chart
                .draw_series(DashedLineSeries::new(roof, 6, 4, color.stroke_width(1)))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::record::sample;

    #[test]
    fn axis_labels_drop_trailing_zeros() {
        assert_eq!(gbps_label(100.0), "100");
        assert_eq!(gbps_label(2.5), "2.5");
        assert_eq!(gbps_label(0.01), "0.01");
        assert_eq!(gbps_label(1.0), "1");
    }

    #[test]
    fn svg_chart_is_written() {
        let dir = std::env::temp_dir().join(format!("bnorm-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("chart.svg");
        let mut r = vec![
            sample("train_forward", "cpu", None, 4.0),
            sample("train_forward", "vulkan", Some("timestamp"), 1.0),
        ];
        r[1].gbps = 4.0;
        write_svg(&path, &r, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("8x64x32x32")
                && svg.contains("vulkan: d, timestamp time")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(write_svg(&dir.join("missing-dir/x.svg"), &r, "t").is_err());
    }
}
