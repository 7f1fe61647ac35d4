//! Named access to a module's float parameters, by dotted path such as
//! `layers.1.mlp.experts.gate_proj`. Enum variants (`Dense`, `Moe`) do not
//! appear in paths, so a path reads like the Hugging Face key it maps to.
//!
//! This is the one mechanism behind checkpoint save/load and HF import/export.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::DType;
use std::collections::BTreeMap;

/// Tracks the dotted path while a visitor or mapper walks the module tree.
#[derive(Default)]
pub struct PathStack(Vec<Option<String>>);

impl PathStack {
    /// Call from `enter_module`.
    pub fn enter(&mut self, name: &str, container_type: &str) {
        // Enum variants are not part of a parameter's name.
        let part = (!container_type.starts_with("Enum:")).then(|| name.to_string());
        self.0.push(part);
    }
    /// Call from `exit_module`.
    pub fn exit(&mut self) {
        self.0.pop();
    }
    /// The current dotted path.
    pub fn path(&self) -> String {
        self.0
            .iter()
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
            .join(".")
    }
}

struct Collect {
    path: PathStack,
    out: BTreeMap<String, TensorData>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(self.path.path(), param.val().into_data());
    }
}

/// Every float parameter of `module`, read back to the host, by path.
pub fn collect<M: Module>(module: &M) -> BTreeMap<String, TensorData> {
    let mut v = Collect {
        path: PathStack::default(),
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// The gradient of every float parameter of `module` that has one in
/// `grads`, read back to the host, by path.
pub fn grads<M: Module>(module: &M, grads: &GradientsParams) -> BTreeMap<String, TensorData> {
    struct Grads<'a> {
        path: PathStack,
        grads: &'a GradientsParams,
        out: BTreeMap<String, TensorData>,
    }
    impl ModuleVisitor for Grads<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.out.insert(self.path.path(), g.into_data());
            }
        }
    }
    let mut v = Grads {
        path: PathStack::default(),
        grads,
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Draw every lazily initialised parameter of `module` now, each from its
/// own random stream: the device is reseeded with a hash of `seed` and
/// `key(path)` before each draw.
///
/// Burn's initialisers defer the draw to a parameter's first use, which would
/// make a model's initial weights depend on whatever else draws from the
/// device's random stream before that use: routing noise, expert dropout, a
/// step's reseed. Drawing at construction ties the weights to `seed` and
/// nothing else; drawing each from its own stream makes a parameter's
/// initial value independent of which other parameters exist. A model with
/// and without a router, a shared expert or an extra layer then starts from
/// the same weights wherever their parameters are the same, so a comparison
/// between such models measures the architecture, not a reshuffled draw.
pub fn materialize<M: Module>(module: &M, seed: u64, key: impl Fn(&str) -> String) {
    struct Touch<K> {
        path: PathStack,
        seed: u64,
        key: K,
    }
    impl<K: Fn(&str) -> String> ModuleVisitor for Touch<K> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_initialized() {
                let key = (self.key)(&self.path.path());
                param.lazy_device().seed(stream_seed(self.seed, &key));
                let _ = param.val();
            }
        }
    }
    module.visit(&mut Touch {
        path: PathStack::default(),
        seed,
        key,
    });
}

/// The seed of the stream that parameter `key` is drawn from under `seed`:
/// FNV-1a of the key, mixed with the seed by one SplitMix64 step.
pub fn stream_seed(seed: u64, key: &str) -> u64 {
    let h = crate::data::split::fnv1a(key.as_bytes());
    crate::data::stream::SplitMix64(seed ^ h.rotate_left(17)).next_u64()
}

/// Every float parameter's path and shape, without reading values.
pub fn shapes<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes(PathStack, BTreeMap<String, Vec<usize>>);
    impl ModuleVisitor for Shapes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.0.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.1.insert(self.0.path(), param.lazy_shape().to_vec());
        }
    }
    let mut v = Shapes(PathStack::default(), BTreeMap::new());
    module.visit(&mut v);
    v.1
}

struct Load<F> {
    path: PathStack,
    /// Paths the source holds and not yet used.
    unused: std::collections::BTreeSet<String>,
    get: F,
    errors: Vec<String>,
}

impl<F: FnMut(&str) -> anyhow::Result<TensorData>> ModuleMapper for Load<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.path();
        if !self.unused.remove(&path) {
            self.errors.push(format!("missing parameter `{path}`"));
            return param;
        }
        let data = match (self.get)(&path) {
            Ok(d) => d,
            Err(e) => {
                self.errors.push(format!("parameter `{path}`: {e:#}"));
                return param;
            }
        };
        let want = param.lazy_shape().to_vec();
        if data.shape().to_vec() != want {
            self.errors.push(format!(
                "parameter `{path}`: expected shape {want:?}, found {:?}",
                data.shape().to_vec()
            ));
            return param;
        }
        // Parameters are f32 (master weights, whatever the compute dtype).
        // Placed on the parameter's device with its gradient setting, without
        // drawing the initial value of one not yet initialised.
        let value = Tensor::<D>::from_data(data.convert_dtype(DType::F32), &param.lazy_device());
        let id = param.id;
        param.transform_for_load(value, id)
    }
}

/// Replace every float parameter of `module` with the value of the same path.
/// Fails, naming each problem, if a path is missing, a shape differs, or a
/// value is left unused.
pub fn load<M: Module>(module: M, values: &BTreeMap<String, TensorData>) -> anyhow::Result<M> {
    load_from(module, values.keys().cloned(), |path| {
        Ok(values[path].clone())
    })
}

/// [`load`] from a source that hands out one tensor at a time: `names` are
/// the paths it holds and `get(path)` reads one. Each tensor is placed
/// before the next is read, so the host holds one at a time.
pub fn load_from<M: Module>(
    module: M,
    names: impl IntoIterator<Item = String>,
    get: impl FnMut(&str) -> anyhow::Result<TensorData>,
) -> anyhow::Result<M> {
    let mut m = Load {
        path: PathStack::default(),
        unused: names.into_iter().collect(),
        get,
        errors: Vec::new(),
    };
    let module = module.map(&mut m);
    let mut errors = m.errors;
    if errors.is_empty() {
        errors.extend(
            m.unused
                .iter()
                .map(|k| format!("unexpected parameter `{k}`")),
        );
    }
    if errors.is_empty() {
        Ok(module)
    } else {
        anyhow::bail!("cannot load parameters:\n  {}", errors.join("\n  "))
    }
}
