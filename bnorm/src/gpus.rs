//! Which adapters a command uses, and opening them: one loop for `check` and `bench`.

use clap::Args;
use wgpu_batchnorm::gpu::{enumerate_adapters, parse_backend};
use wgpu_batchnorm::wgpu::{Backend, Backends};
use wgpu_batchnorm::{AdapterSelection, Error, GpuContext};

/// Which adapters to use (`adapters`, `check`).
#[derive(Debug, Clone, Args)]
pub struct Selection {
    /// Only adapters whose name contains NAME (case-insensitive).
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Only these backends (vulkan, gl, metal, dx12; repeat or separate with commas).
    #[arg(long, value_name = "BACKEND", value_delimiter = ',', value_parser = backend_arg)]
    pub backend: Vec<Backend>,
}

impl Selection {
    /// The environment's selection (`WGPU_BACKEND`, ...) narrowed by the flags.
    pub fn adapter_selection(&self) -> AdapterSelection {
        let mut sel = AdapterSelection::from_env();
        if !self.backend.is_empty() {
            sel.backends = self
                .backend
                .iter()
                .fold(Backends::empty(), |acc, &b| acc | Backends::from(b));
        }
        if let Some(name) = &self.adapter {
            sel = sel.with_name(name.clone());
        }
        sel
    }
}

fn backend_arg(s: &str) -> Result<Backend, String> {
    parse_backend(s)
        .ok_or_else(|| format!("unknown backend {s:?}; expected vulkan, gl, metal or dx12"))
}

/// An adapter that matched but could not be opened.
#[derive(Debug)]
pub struct Failed {
    /// `backend:name`.
    pub label: String,
    /// Why it did not open; [`Error::Unsupported`] when it cannot run this crate.
    pub error: Error,
}

/// The adapters of a selection, opened or not.
#[derive(Default)]
pub struct Opened {
    /// The devices that opened, best first.
    pub contexts: Vec<GpuContext>,
    /// The adapters that did not, and why.
    pub failed: Vec<Failed>,
}

/// Opens every adapter of `selection` (and, when `label_filter` is given,
/// whose `backend:name` contains it, case-insensitively), saying on stderr
/// which one it opens.
pub fn open_adapters(selection: &AdapterSelection, label_filter: Option<&str>) -> Opened {
    let filter = label_filter.map(str::to_lowercase);
    let mut opened = Opened::default();
    for adapter in enumerate_adapters(selection) {
        let info = adapter.get_info();
        let label = format!("{}:{}", info.backend, info.name);
        if filter
            .as_ref()
            .is_some_and(|f| !label.to_lowercase().contains(f))
        {
            continue;
        }
        eprintln!("opening {label}...");
        match GpuContext::from_adapter(&adapter) {
            Ok(ctx) => opened.contexts.push(ctx),
            Err(error) => opened.failed.push(Failed { label, error }),
        }
    }
    opened
}
