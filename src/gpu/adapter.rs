//! Which adapters wgpu finds, and which of them a caller asked for.

/// Which adapter(s) to use.
///
/// [`AdapterSelection::from_env`] reads wgpu's own variables: `WGPU_BACKEND`
/// (e.g. `vulkan`, `gl`, `metal`, `dx12`, comma-separated), `WGPU_ADAPTER_NAME`
/// (a case-insensitive substring of the adapter name) and `WGPU_POWER_PREF`
/// (`low`, `high`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSelection {
    /// Backends to look at.
    pub backends: wgpu::Backends,
    /// Case-insensitive substring the adapter name must contain.
    pub name: Option<String>,
    /// Preferred kind of adapter when several match.
    pub power_preference: wgpu::PowerPreference,
}

impl Default for AdapterSelection {
    /// Every native backend, any name, high performance first.
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::PRIMARY | wgpu::Backends::GL,
            name: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
        }
    }
}

impl AdapterSelection {
    /// The default selection, narrowed by `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`
    /// and `WGPU_POWER_PREF` when they are set.
    pub fn from_env() -> Self {
        let mut sel = Self::default();
        if let Some(b) = wgpu::Backends::from_env() {
            sel.backends = b;
        }
        if let Ok(name) = std::env::var("WGPU_ADAPTER_NAME")
            && !name.is_empty()
        {
            sel.name = Some(name);
        }
        if let Some(p) = wgpu::PowerPreference::from_env() {
            sel.power_preference = p;
        }
        sel
    }

    /// Only `backend`.
    pub fn with_backend(mut self, backend: wgpu::Backend) -> Self {
        self.backends = wgpu::Backends::from(backend);
        self
    }

    /// Only adapters whose name contains `name` (case-insensitive).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub(crate) fn describe(&self) -> String {
        let mut s = format!(" among backends {:?}", self.backends);
        if let Some(n) = &self.name {
            s.push_str(&format!(" with a name containing {n:?}"));
        }
        s
    }

    fn matches(&self, info: &wgpu::AdapterInfo) -> bool {
        self.name
            .as_ref()
            .is_none_or(|n| info.name.to_lowercase().contains(&n.to_lowercase()))
    }
}

/// Parses a backend name as `bnorm` and the environment spell it.
pub fn parse_backend(name: &str) -> Option<wgpu::Backend> {
    match name.to_ascii_lowercase().as_str() {
        "vulkan" | "vk" => Some(wgpu::Backend::Vulkan),
        "gl" | "gles" | "opengl" => Some(wgpu::Backend::Gl),
        "metal" | "mtl" => Some(wgpu::Backend::Metal),
        "dx12" | "d3d12" => Some(wgpu::Backend::Dx12),
        _ => None,
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

fn rank(info: &wgpu::AdapterInfo, pref: wgpu::PowerPreference) -> (u8, u8) {
    use wgpu::DeviceType as D;
    let kind = match (info.device_type, pref) {
        (D::DiscreteGpu, wgpu::PowerPreference::LowPower) => 1,
        (D::IntegratedGpu, wgpu::PowerPreference::LowPower) => 0,
        (D::DiscreteGpu, _) => 0,
        (D::IntegratedGpu, _) => 1,
        (D::VirtualGpu, _) => 2,
        (D::Cpu, _) => 3,
        (D::Other, _) => 4,
    };
    let backend = u8::from(info.backend == wgpu::Backend::Gl);
    (kind, backend)
}

/// Whether `info` names a CPU adapter on Vulkan (Mesa's lavapipe), where
/// the single passes and the packed f16 kernels measured faster
/// (BENCHMARKS.md).
pub(crate) fn cpu_vulkan(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu && info.backend == wgpu::Backend::Vulkan
}

/// The subgroup size of a device with wgpu's `SUBGROUP` feature (in
/// `features`) whose adapter runs compute shaders in subgroups of one fixed
/// size (lavapipe: 8), else `None`.
pub(crate) fn fixed_subgroup_size(
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
) -> Option<u32> {
    let fixed = info.subgroup_min_size == info.subgroup_max_size;
    (features.contains(wgpu::Features::SUBGROUP)
        && fixed
        && info.subgroup_min_size.is_power_of_two())
    .then_some(info.subgroup_min_size)
}

/// Adapters that match `selection` and can run compute shaders, best first.
pub(crate) fn matching_adapters(selection: &AdapterSelection) -> Vec<wgpu::Adapter> {
    let instance = instance(selection.backends);
    let mut adapters: Vec<wgpu::Adapter> =
        pollster::block_on(instance.enumerate_adapters(selection.backends))
            .into_iter()
            .filter(|a| selection.matches(&a.get_info()))
            .filter(|a| {
                a.get_downlevel_capabilities()
                    .flags
                    .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
            })
            .collect();
    adapters.sort_by_key(|a| rank(&a.get_info(), selection.power_preference));
    adapters
}

/// Every adapter wgpu finds for `selection`, best first, whether or not it can run this crate.
pub fn enumerate_adapters(selection: &AdapterSelection) -> Vec<wgpu::Adapter> {
    let instance = instance(selection.backends);
    let mut adapters: Vec<wgpu::Adapter> =
        pollster::block_on(instance.enumerate_adapters(selection.backends))
            .into_iter()
            .filter(|a| selection.matches(&a.get_info()))
            .collect();
    adapters.sort_by_key(|a| rank(&a.get_info(), selection.power_preference));
    adapters
}
