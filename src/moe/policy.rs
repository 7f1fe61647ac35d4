//! Which dispatch plan a layer builds: its drop policy (drop, dropless or
//! reroute) and its backend (on the host for the CPU, with device
//! operations elsewhere) pick one of the builders in [`super::dispatch`]
//! and [`super::reroute`].

use super::dispatch::{self, DispatchPlan};
use super::reroute;
use super::router::RoutingDecision;
use crate::config::{DropPolicy, MoeConfig};
use crate::kernels::on_cpu;
use burn::prelude::*;

/// What happens to an assignment whose expert is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// It is dropped.
    Drop,
    /// It tries the token's next `depth` choices, best first, and takes
    /// the first with room ([`super::reroute`]).
    Reroute {
        /// Choices past the token's own k that may be tried.
        depth: usize,
    },
}

/// What the layer's policy does with an assignment whose expert is full.
pub fn overflow(cfg: &MoeConfig) -> Overflow {
    match cfg.drop_policy {
        DropPolicy::Reroute => Overflow::Reroute {
            depth: cfg.reroute_depth.unwrap_or(usize::MAX),
        },
        DropPolicy::Drop | DropPolicy::Dropless => Overflow::Drop,
    }
}

/// Build the dispatch plan: on the host on the CPU backend, with device
/// operations elsewhere. The two builders of each policy agree slot for
/// slot wherever no two tokens competing for an expert have the same
/// probability.
///
/// # Shapes
/// - `valid`: `[T]`, 1.0 for real tokens and 0.0 for padding
pub fn plan(
    decision: &RoutingDecision,
    valid: Tensor<1>,
    capacity: Option<usize>,
    overflow: Overflow,
) -> DispatchPlan {
    let host = on_cpu(&decision.routing_map.device());
    match (capacity, overflow) {
        (Some(c), Overflow::Reroute { depth }) if host => {
            reroute::plan_on_host(decision, valid, c, depth)
        }
        (Some(c), Overflow::Reroute { depth }) => {
            reroute::plan_on_device(decision, valid, c, depth)
        }
        _ if host => dispatch::plan_on_host(decision, valid, capacity),
        _ => dispatch::plan_on_device(decision, valid, capacity),
    }
}
