//! The architecture keys: the config keys that shape a model's parameters.
//! A resume refuses to change any of them and `init_from` adopts them all,
//! comparing and copying them as one unit.

use super::{show, table, ModelConfig, MoeConfig};
use serde::{Deserialize, Serialize};

/// The keys that shape a model's parameters, as one unit: the whole
/// `[model]` section and the `[moe]` keys that decide which layers are MoE
/// and what they hold ([`MoeArchitecture`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Architecture {
    /// `[model]`.
    pub model: ModelConfig,
    /// The architecture keys of `[moe]`.
    pub moe: MoeArchitecture,
}

impl Architecture {
    /// `section.key: old -> new` for every key that differs from `other`.
    pub fn diff(&self, other: &Architecture) -> Vec<String> {
        let mut out = Vec::new();
        for (section, a, b) in [
            ("model", table(&self.model), table(&other.model)),
            ("moe", table(&self.moe), table(&other.moe)),
        ] {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                if a.get(key) != b.get(key) {
                    out.push(format!(
                        "{section}.{key}: {} -> {}",
                        show(a.get(key)),
                        show(b.get(key))
                    ));
                }
            }
        }
        out
    }
}

/// The `[moe]` keys that shape the parameters: which blocks are MoE and
/// what each holds. Every other `[moe]` key is a routing knob that a resume
/// or a fine-tune may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeArchitecture {
    /// `moe.num_experts`.
    pub num_experts: usize,
    /// `moe.d_expert`.
    pub d_expert: usize,
    /// `moe.every_n_layers`.
    pub every_n_layers: usize,
    /// `moe.first_k_dense`.
    pub first_k_dense: usize,
    /// `moe.layers`.
    pub layers: Option<Vec<usize>>,
    /// `moe.num_shared_experts`.
    pub num_shared_experts: usize,
    /// `moe.d_shared_expert`.
    pub d_shared_expert: Option<usize>,
    /// `moe.shared_expert_gate`.
    pub shared_expert_gate: bool,
    /// `moe.aux_free_bias` (the selection bias is a stored parameter).
    pub aux_free_bias: bool,
}

impl MoeConfig {
    /// The keys of this section that shape the parameters.
    pub fn architecture(&self) -> MoeArchitecture {
        MoeArchitecture {
            num_experts: self.num_experts,
            d_expert: self.d_expert,
            every_n_layers: self.every_n_layers,
            first_k_dense: self.first_k_dense,
            layers: self.layers.clone(),
            num_shared_experts: self.num_shared_experts,
            d_shared_expert: self.d_shared_expert,
            shared_expert_gate: self.shared_expert_gate,
            aux_free_bias: self.aux_free_bias,
        }
    }

    /// Take every key of `arch`, keeping the routing knobs.
    pub fn set_architecture(&mut self, arch: MoeArchitecture) {
        let MoeArchitecture {
            num_experts,
            d_expert,
            every_n_layers,
            first_k_dense,
            layers,
            num_shared_experts,
            d_shared_expert,
            shared_expert_gate,
            aux_free_bias,
        } = arch;
        self.num_experts = num_experts;
        self.d_expert = d_expert;
        self.every_n_layers = every_n_layers;
        self.first_k_dense = first_k_dense;
        self.layers = layers;
        self.num_shared_experts = num_shared_experts;
        self.d_shared_expert = d_shared_expert;
        self.shared_expert_gate = shared_expert_gate;
        self.aux_free_bias = aux_free_bias;
    }
}

/// The `[moe]` routing keys that, beside the architecture, decide what a
/// model computes: a run continued from a checkpoint (`train.init_from`)
/// takes them from it unless the config sets them explicitly.
pub const FUNCTION_KEYS: [&str; 7] = [
    "top_k",
    "score",
    "topk_order",
    "normalize_topk",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
];

/// What adopting a source's function keys did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Adopted {
    /// `moe.key: ours -> source's` for each key taken from the source.
    pub taken: Vec<String>,
    /// A warning for each key set explicitly to a value other than the
    /// source's (the explicit value stays).
    pub overridden: Vec<String>,
}

impl MoeConfig {
    /// Take each of [`FUNCTION_KEYS`] from `source`, except the ones in
    /// `explicit` (full `moe.key` paths), which keep their value and are
    /// reported when they differ.
    pub fn adopt_function(&mut self, source: &MoeConfig, explicit: &[String]) -> Adopted {
        let (mut ours, theirs) = (table(&*self), table(source));
        let mut out = Adopted::default();
        for key in FUNCTION_KEYS {
            let (a, b) = (ours.get(key).cloned(), theirs.get(key).cloned());
            if a == b {
                continue;
            }
            let path = format!("moe.{key}");
            if explicit.contains(&path) {
                out.overridden.push(format!(
                    "{path} = {} is set in the config; the source has {}: the model will compute something else than the source",
                    show(a.as_ref()),
                    show(b.as_ref())
                ));
            } else if let Some(b) = b {
                out.taken
                    .push(format!("{path}: {} -> {b}", show(a.as_ref())));
                ours.insert(key.to_string(), b);
            }
        }
        if let Ok(updated) = toml::Value::Table(ours).try_into::<MoeConfig>() {
            *self = updated;
        }
        out
    }
}
