//! The table `bnorm bench` prints on stdout.

use super::record::Record;
use std::fmt::Write as _;

/// Seconds with a unit.
pub fn human_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// The table printed on screen: a header, a rule, a row per record; with
/// `--op fused` records, also the fusion and the fused speedup.
pub fn table(records: &[Record]) -> String {
    let fused = records.iter().any(|r| r.fusion.is_some());
    let mut head = vec![
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
    if fused {
        head.insert(1, "fusion");
        head.push("vs unfused");
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let mut row = vec![
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
            ];
            if fused {
                row.insert(1, r.fusion.unwrap_or("-").to_string());
                row.push(r.fused_speedup.map_or("-".into(), |g| format!("{g:.2}x")));
            }
            row
        })
        .collect();
    render(&head, &rows, if fused { 8 } else { 7 })
}

/// A header, a rule and the rows, in columns two spaces apart: the first
/// `text_columns` left-aligned, the rest (numbers) right-aligned.
pub fn render(head: &[&str], rows: &[Vec<String>], text_columns: usize) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            w[i] = w[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            if i < text_columns {
                let _ = write!(s, "{cell:<width$}", width = w[i]);
            } else {
                let _ = write!(s, "{cell:>width$}", width = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head);
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (w.len() - 1)));
    out.push('\n');
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
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
