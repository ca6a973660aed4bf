"""Hugging Face ↔ megatron-core weights, and their tensor/pipeline/expert-parallel shards.

megatron-core's ``GPTModel`` (with its local layer spec) names and lays out a decoder's
weights differently from transformers:

- one ``linear_qkv`` per layer holds q, k and v *per query group*: for each group, its
  query heads, then its key head, then its value head (so a tensor-parallel rank can own
  whole groups);
- one ``linear_fc1`` holds gate and up (SwiGLU), and a tensor-parallel rank owns a slice
  of each, not a contiguous slice of the pair;
- a pipeline stage numbers its layers from 0, and an expert-parallel rank its experts.

The transformers side is the checkpoint's format, as safetensors files hold it (one
``mlp.experts.N.gate_proj`` per expert), which transformers 5 fuses only as it loads.

This module is tensors only (no megatron import): it converts a whole model either way
and cuts or joins the shards, so everything here is checked on a CPU against the real
models (``tests/``). ``Layout`` carries the architecture facts the conversion needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: transformers model types whose weights this module converts.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Layout:
    """What the conversion needs to know about a decoder: its shape, whether the input
    embedding and the output layer share one matrix, biases, q/k norms and experts."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0

    @classmethod
    def from_hf(cls, config: Any) -> Layout:
        """The layout of a transformers config (``AutoConfig``) of a supported model type."""
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"megatron-core conversion supports {', '.join(SUPPORTED_MODEL_TYPES)}, not {config.model_type!r}"
            )
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=config.model_type in ("qwen3", "qwen3_moe"),
            num_experts=config.num_experts if config.model_type == "qwen3_moe" else 0,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


# --------------------------------------------------------------------------- whole models


def hf_to_megatron(
    hf: Mapping[str, Any], layout: Layout, *, layers: Iterable[int] | None = None, first: bool = True, last: bool = True
) -> dict[str, Any]:
    """A transformers state dict (``model.layers.N...``) as megatron-core's, unsharded.

    ``layers`` (default all), ``first`` (the embedding) and ``last`` (the final norm and
    output layer) choose what to convert, so a pipeline stage reads only its part of a
    lazily loaded ``hf``.
    """
    out = {}
    if first or (last and layout.tied_embeddings):
        out["embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"]
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not layout.tied_embeddings:
            out["output_layer.weight"] = hf["lm_head.weight"]
    for index in range(layout.num_layers) if layers is None else layers:
        converted = _layer_to_megatron(_Prefixed(hf, f"model.layers.{index}."), layout)
        out.update({f"decoder.layers.{index}.{key}": value for key, value in converted.items()})
    return out


def megatron_to_hf(megatron: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """The inverse of ``hf_to_megatron``: an unsharded megatron-core state dict as transformers'."""
    out = {
        "model.embed_tokens.weight": megatron["embedding.word_embeddings.weight"],
        "model.norm.weight": megatron["decoder.final_layernorm.weight"],
    }
    if not layout.tied_embeddings:
        out["lm_head.weight"] = megatron["output_layer.weight"]
    layers: dict[int, dict[str, Any]] = {}
    for key, value in megatron.items():
        if match := _LAYER.match(key):
            layers.setdefault(int(match[1]), {})[match[2]] = value
    for index, layer in sorted(layers.items()):
        out.update({f"model.layers.{index}.{key}": value for key, value in _layer_to_hf(layer, layout).items()})
    return out


class _Prefixed:
    """``hf[prefix + key]`` as ``view[key]``: one layer of a (possibly lazy) state dict."""

    def __init__(self, state: Mapping[str, Any], prefix: str) -> None:
        self.state, self.prefix = state, prefix

    def __getitem__(self, key: str) -> Any:
        return self.state[self.prefix + key]


#: per layer, transformers name -> megatron-core name of the tensors that only move.
_MOVED = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
_QK_NORMS = {
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}
_ROUTER = {"mlp.gate.weight": "mlp.router.weight"}


def _moved(layout: Layout) -> dict[str, str]:
    return {**_MOVED, **(_QK_NORMS if layout.qk_norm else {}), **(_ROUTER if layout.num_experts else {})}


def _mlps(layout: Layout) -> list[tuple[str, str]]:
    """(transformers prefix, megatron-core prefix) of each SwiGLU MLP in a layer: the
    dense one, or every expert (one by one, as the checkpoint holds them)."""
    if layout.num_experts:
        return [
            (f"mlp.experts.{expert}.", f"mlp.experts.local_experts.{expert}.") for expert in range(layout.num_experts)
        ]
    return [("mlp.", "mlp.")]


def _layer_to_megatron(hf: Any, layout: Layout) -> dict[str, Any]:
    import torch

    out = {megatron: hf[name] for name, megatron in _moved(layout).items()}
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    out["self_attention.linear_qkv.weight"] = _interleave_qkv(*(hf[f"{name}.weight"] for name in projections), layout)
    if layout.qkv_bias:
        out["self_attention.linear_qkv.bias"] = _interleave_qkv(*(hf[f"{name}.bias"] for name in projections), layout)
    for name, megatron in _mlps(layout):
        out[f"{megatron}linear_fc1.weight"] = torch.cat([hf[f"{name}gate_proj.weight"], hf[f"{name}up_proj.weight"]])
        out[f"{megatron}linear_fc2.weight"] = hf[f"{name}down_proj.weight"]
    return out


def _layer_to_hf(megatron: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    out = {name: megatron[moved] for name, moved in _moved(layout).items()}
    for suffix in ("weight", "bias") if layout.qkv_bias else ("weight",):
        q, k, v = _split_qkv(megatron[f"self_attention.linear_qkv.{suffix}"], layout)
        out.update({f"self_attn.q_proj.{suffix}": q, f"self_attn.k_proj.{suffix}": k, f"self_attn.v_proj.{suffix}": v})
    for name, moved in _mlps(layout):
        out[f"{name}gate_proj.weight"], out[f"{name}up_proj.weight"] = megatron[f"{moved}linear_fc1.weight"].chunk(2)
        out[f"{name}down_proj.weight"] = megatron[f"{moved}linear_fc2.weight"]
    return out


def _interleave_qkv(q: Any, k: Any, v: Any, layout: Layout) -> Any:
    """[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...] (rows)."""
    import torch

    groups, rest = layout.num_query_groups, q.shape[1:]
    q = q.reshape(groups, layout.heads_per_group * layout.head_dim, *rest)
    k = k.reshape(groups, layout.head_dim, *rest)
    v = v.reshape(groups, layout.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(qkv: Any, layout: Layout) -> tuple[Any, Any, Any]:
    rest = qkv.shape[1:]
    grouped = qkv.reshape(layout.num_query_groups, (layout.heads_per_group + 2) * layout.head_dim, *rest)
    q, k, v = grouped.split([layout.heads_per_group * layout.head_dim, layout.head_dim, layout.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """One rank's place in the model-parallel mesh: its tensor-parallel rank, pipeline
    stage and expert-parallel rank, and the sizes of those dimensions."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0

    def layers(self, layout: Layout) -> range:
        """The global indices of the decoder layers this pipeline stage holds."""
        per_stage = layout.num_layers // self.pp
        return range(self.pp_rank * per_stage, (self.pp_rank + 1) * per_stage)

    def experts(self, layout: Layout) -> range:
        per_rank = layout.num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def check_divisible(layout: Layout, *, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """ValueError naming the first size that does not divide the model evenly."""
    for count, what, size, name in (
        (layout.num_query_groups, "key/value heads", tp, "tp"),
        (layout.num_heads, "attention heads", tp, "tp"),
        (layout.vocab_size, "vocabulary entries", tp, "tp"),
        (layout.num_layers, "layers", pp, "pp"),
        (layout.num_experts or ep, "experts", ep, "ep"),
    ):
        if count % size:
            raise ValueError(f"{name}={size} does not divide the model's {count} {what}")


def shard_state_dict(full: Mapping[str, Any], layout: Layout, shard: Shard) -> dict[str, Any]:
    """This rank's part of an unsharded megatron-core state dict, named as its model
    names it (layers and experts numbered from 0 on each stage and rank)."""
    layers, experts = shard.layers(layout), shard.experts(layout)
    out = {}
    for key, value in full.items():
        local = _local_name(key, layout, shard, layers, experts)
        if local is not None:
            out[local] = _tp_slice(local, value, shard.tp, shard.tp_rank)
    if shard.last_stage and layout.tied_embeddings and not shard.first_stage:
        # the last stage keeps its own copy of the shared matrix; megatron keeps the two
        # in step by all-reducing their gradients over the embedding group
        out["output_layer.weight"] = _tp_slice(
            "output_layer.weight", full["embedding.word_embeddings.weight"], shard.tp, shard.tp_rank
        )
    return out


def join_shards(shards: Mapping[Shard, Mapping[str, Any]], layout: Layout) -> dict[str, Any]:
    """The unsharded state dict from every rank's part (the inverse of ``shard_state_dict``).

    ``shards`` maps each rank's ``Shard`` to its state dict; ranks that hold the same part
    (data-parallel replicas) need appear only once, and a weight tensor parallelism does
    not split (a norm, an expert) only from one tensor-parallel rank.
    """
    tp = next(iter(shards)).tp
    pieces: dict[str, dict[int, Any]] = {}
    for shard, state in shards.items():
        layers, experts = shard.layers(layout), shard.experts(layout)
        for local, value in state.items():
            if local == "output_layer.weight" and layout.tied_embeddings:
                continue  # the last stage's copy of the embedding
            pieces.setdefault(_global_name(local, layers, experts), {})[shard.tp_rank] = value
    out = {}
    for key, by_rank in pieces.items():
        if _split_kind(key) is None:  # whole on every tensor-parallel rank (norms, experts): any copy
            out[key] = next(iter(by_rank.values()))
            continue
        if len(by_rank) != tp:
            raise ValueError(f"{key}: {len(by_rank)} of {tp} tensor-parallel shards")
        out[key] = _tp_join(key, [by_rank[rank] for rank in range(tp)])
    return out


def _local_name(key: str, layout: Layout, shard: Shard, layers: range, experts: range) -> str | None:
    match = _LAYER.match(key)
    if match is None:
        if key.startswith("embedding."):
            return key if shard.first_stage else None
        return key if shard.last_stage else None  # final norm, output layer
    index, rest = int(match[1]), match[2]
    if index not in layers:
        return None
    if expert := _EXPERT.match(rest):
        if int(expert[1]) not in experts:
            return None
        rest = f"mlp.experts.local_experts.{int(expert[1]) - experts.start}.{expert[2]}"
    return f"decoder.layers.{index - layers.start}.{rest}"


def _global_name(local: str, layers: range, experts: range) -> str:
    match = _LAYER.match(local)
    if match is None:
        return local
    rest = match[2]
    if expert := _EXPERT.match(rest):
        rest = f"mlp.experts.local_experts.{int(expert[1]) + experts.start}.{expert[2]}"
    return f"decoder.layers.{int(match[1]) + layers.start}.{rest}"


#: how tensor parallelism splits each kind of weight: along the rows (column-parallel
#: layers, vocab-parallel embedding), along the columns (row-parallel layers), or as a
#: pair of row blocks (gate and up, each split along its rows).
_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
_GATED = ("linear_fc1.weight",)
#: expert weights are not split over tensor-parallel ranks (expert tensor parallelism 1).
_NOT_SPLIT = ("local_experts.", "router.")


def _split_kind(name: str) -> str | None:
    if any(part in name for part in _NOT_SPLIT):
        return None
    for kind, suffixes in (("rows", _COLUMN_PARALLEL), ("columns", _ROW_PARALLEL), ("gated", _GATED)):
        if name.endswith(suffixes):
            return kind
    return None


def _tp_slice(name: str, tensor: Any, tp: int, rank: int) -> Any:
    kind = _split_kind(name)
    if tp == 1 or kind is None:
        return tensor
    if kind == "rows":
        return tensor.chunk(tp, dim=0)[rank]
    if kind == "columns":
        return tensor.chunk(tp, dim=1)[rank]
    import torch

    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])


def _tp_join(name: str, pieces: Iterable[Any]) -> Any:
    import torch

    pieces = list(pieces)
    kind = _split_kind(name)
    if len(pieces) == 1 or kind is None:
        return pieces[0]
    if kind == "rows":
        return torch.cat(pieces, dim=0)
    if kind == "columns":
        return torch.cat(pieces, dim=1)
    halves = [piece.chunk(2, dim=0) for piece in pieces]
    return torch.cat([torch.cat([gate for gate, _ in halves]), torch.cat([up for _, up in halves])])
