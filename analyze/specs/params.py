"""Building blocks of a parameter inventory: module classes, linear weights, parameter groups.

A model's parameters are split into *module classes* (attention, router, one routed expert, ...).
Each class is described per *unit* (one decoder layer's attention, one expert of one MoE layer,
the whole embedding, ...) by a `ParamGroup`: the quantisable linear weights (with their shapes,
so block and group scale overheads can be computed exactly) plus the parameters that every
quantiser keeps in the unquantised dtype (biases, norm weights, attention sinks, router weights,
embedding tables) and the few tensors kept in fp32 whatever the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModuleClass = Literal[
    "attention",
    "router",
    "routed_expert",
    "shared_experts",
    "dense_ffn",
    "embedding",
    "lm_head",
    "norms",
]

#: Every module class, in report order.
MODULE_CLASSES: tuple[ModuleClass, ...] = (
    "attention",
    "router",
    "routed_expert",
    "shared_experts",
    "dense_ffn",
    "embedding",
    "lm_head",
    "norms",
)


@dataclass(frozen=True)
class LinearWeight:
    """One linear layer's weight matrix (bias excluded), as stored in the checkpoint.

    `name` is the checkpoint name of the module holding the weight, with `{layer}` / `{expert}`
    placeholders, e.g. ``model.layers.{layer}.self_attn.q_proj`` (gpt-oss's fused experts: both
    weights belong to ``model.layers.{layer}.mlp.experts``); quantisation ignore lists are matched
    against it.
    """

    name: str
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        """Weight elements, out_features × in_features."""
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one unit of a module class.

    linears: quantisable weight matrices.
    other: parameter elements kept in the checkpoint's unquantised dtype (biases, norms, sinks,
        router weights, embedding tables).
    fp32: parameter elements kept in fp32 whatever the dtype (DeepSeek-V3 `e_score_correction_bias`).
    """

    linears: tuple[LinearWeight, ...] = ()
    other: int = 0
    fp32: int = 0

    @property
    def linear_params(self) -> int:
        """Elements in the quantisable weight matrices."""
        return sum(w.params for w in self.linears)

    @property
    def params(self) -> int:
        """All parameter elements of the unit."""
        return self.linear_params + self.other + self.fp32


EMPTY_GROUP = ParamGroup()
