"""Weights from load: per-endpoint load signals in, endpoint and locality weights out.

`signals` (the types a policy reads and answers with), `params` (the `orca:` parameters),
`policy` (the `WeightPolicy` interface and `module:Class` loading), `headroom` (the
built-in policy, with `tracking`: its per-endpoint state, and `explanation`: why each
weight is what it is), `engine` (runs each pool's policy on a tick and hands changed weights to
a publish callable).

This package's names below are the public API for custom policies
(`policy: my_module:MyPolicy` in the snapshot file): import them from `lrs.weights`.
"""

from lrs.contract import MAX_WEIGHT
from lrs.weights.params import ParamError, Params, parse_params
from lrs.weights.policy import PolicyError, WeightPolicy, check_weights, load_policy
from lrs.weights.signals import EndpointInput, EndpointLoad, PoolWeights

__all__ = [
    "MAX_WEIGHT",
    "EndpointInput",
    "EndpointLoad",
    "ParamError",
    "Params",
    "PolicyError",
    "PoolWeights",
    "WeightPolicy",
    "check_weights",
    "load_policy",
    "parse_params",
]
