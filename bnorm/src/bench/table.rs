//! The table `bnorm bench` prints on stdout.

use super::record::Record;
use std::fmt::Write as _;

/// Seconds with a unit.
fn human_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// The table printed on screen: a header, a rule, a row per record.
pub fn table(records: &[Record]) -> String {
    let head = [
        "op",
        "shape",
        "layout",
        "dtype",
        "backend",
        "device",
        "time from",
        "median",
        "GB/s",
        "copy GB/s",
        "of copy",
        "GPU/CPU",
    ];
    let rows: Vec<[String; 12]> = records
        .iter()
        .map(|r| {
            [
                r.op.to_string(),
                r.shape.clone(),
                r.layout.to_string(),
                r.dtype.to_string(),
                r.backend.clone(),
                r.device.clone(),
                r.gpu_time_source.unwrap_or("wall").to_string(),
                human_time(r.median_s),
                format!("{:.2}", r.gbps),
                format!("{:.2}", r.copy_gbps),
                format!("{:.0}%", r.fraction_of_copy * 100.0),
                r.gpu_over_cpu.map_or("-".into(), |g| format!("{g:.2}x")),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            w[i] = w[i].max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < 7 {
                let _ = write!(s, "{cell:<width$}", width = w[i]);
            } else {
                let _ = write!(s, "{cell:>width$}", width = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&head);
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1)));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::record::sample;

    #[test]
    fn table_names_every_column_and_time_source() {
        let t = table(&[sample("backward", "vulkan", Some("timestamp"), 1.5e-3)]);
        let mut lines = t.lines();
        let head = lines.next().unwrap();
        for col in [
            "op",
            "shape",
            "backend",
            "time from",
            "GB/s",
            "copy GB/s",
            "of copy",
            "GPU/CPU",
        ] {
            assert!(head.contains(col), "{head}");
        }
        let row = lines.nth(1).unwrap();
        assert!(
            row.contains("timestamp") && row.contains("1.500 ms") && row.contains("50%"),
            "{row}"
        );
    }
}
