//! `bnorm adapters`: every adapter wgpu finds, with the limits and features
//! this crate depends on.

use crate::gpus::Selection;
use std::io::Write;
use std::process::ExitCode;
use wgpu_batchnorm::Error;
use wgpu_batchnorm::gpu::enumerate_adapters;
use wgpu_batchnorm::wgpu::{DownlevelFlags, Features};

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{n} ({} MiB)", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{n} ({} KiB)", n / KIB)
    } else {
        n.to_string()
    }
}

/// Lists the adapters of `sel` on stdout; exit status 1 when there is none.
pub fn adapters(sel: &Selection) -> ExitCode {
    let selection = sel.adapter_selection();
    eprintln!(
        "enumerating adapters for backends {:?}...",
        selection.backends
    );
    let adapters = enumerate_adapters(&selection);
    if adapters.is_empty() {
        eprintln!(
            "\n*** {} ***\n",
            Error::NoAdapter {
                selection: format!(" among backends {:?}", selection.backends)
            }
        );
        return ExitCode::from(1);
    }
    let mut out = std::io::stdout().lock();
    for (i, a) in adapters.iter().enumerate() {
        let info = a.get_info();
        let l = a.limits();
        let f = a.features();
        let compute = a
            .get_downlevel_capabilities()
            .flags
            .contains(DownlevelFlags::COMPUTE_SHADERS);
        let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
            (true, true) => "(not reported)".to_string(),
            (false, true) => info.driver.clone(),
            (true, false) => info.driver_info.clone(),
            (false, false) => format!("{} ({})", info.driver, info.driver_info),
        };
        let _ = writeln!(out, "#{i} {}: {}", info.backend, info.name);
        let _ = writeln!(
            out,
            "    type {:?}, vendor {:#06x}, device {:#06x}",
            info.device_type, info.vendor, info.device
        );
        let _ = writeln!(out, "    driver: {driver}");
        let _ = writeln!(out, "    compute shaders: {}", yes_no(compute));
        let rows: [(&str, String); 6] = [
            (
                "max_storage_buffer_binding_size",
                bytes(l.max_storage_buffer_binding_size),
            ),
            ("max_buffer_size", bytes(l.max_buffer_size)),
            (
                "max_compute_workgroup_size_x",
                l.max_compute_workgroup_size_x.to_string(),
            ),
            (
                "max_compute_invocations_per_workgroup",
                l.max_compute_invocations_per_workgroup.to_string(),
            ),
            (
                "max_compute_workgroups_per_dimension",
                l.max_compute_workgroups_per_dimension.to_string(),
            ),
            (
                "max_compute_workgroup_storage_size",
                bytes(u64::from(l.max_compute_workgroup_storage_size)),
            ),
        ];
        let _ = writeln!(out, "    limits:");
        for (name, value) in rows {
            let _ = writeln!(out, "      {name:<40} {value}");
        }
        let subgroup = if f.contains(Features::SUBGROUP) {
            format!(
                "yes (size {}..{})",
                info.subgroup_min_size, info.subgroup_max_size
            )
        } else {
            "no".to_string()
        };
        let _ = writeln!(
            out,
            "    features: SHADER_F16 {}, SUBGROUP {subgroup}, TIMESTAMP_QUERY {}",
            yes_no(f.contains(Features::SHADER_F16)),
            yes_no(f.contains(Features::TIMESTAMP_QUERY))
        );
    }
    ExitCode::SUCCESS
}
