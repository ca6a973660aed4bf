"""LongLoRA's shifted sparse attention (S²-Attn), as a transformers attention function.

In training, each row's tokens are split into groups and attention stays inside a group:
half of the heads use groups ``[0, G), [G, 2G), ...``, the other half groups shifted by
``G/2`` (``[0, G/2), [G/2, 3G/2), ...``), so that information still flows between
neighbouring groups. Attention costs ``L * G`` instead of ``L * L``, which is what lets a
short-context model be tuned on long rows. In evaluation and generation the model
attends to everything, as LongLoRA prescribes.

LongLoRA's reference code shifts by rolling the sequence, which wraps the last tokens
around into the first group, where earlier tokens see them; here the shifted half is
padded instead, so no token ever attends to a later one. The mask transformers builds
(padding, packed examples kept apart) still applies inside each group.
"""

from __future__ import annotations

from typing import Any

from modelloop.plugin import warn_once

#: the name the function is registered under with transformers.
NAME = "longlora_s2"


def register() -> None:
    """Make ``attn_implementation="longlora_s2"`` known to transformers (with sdpa's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, shifted_sparse_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def shifted_sparse_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function protocol: ``query`` ``[batch, heads, length, dim]``,
    ``key``/``value`` per key/value head, ``attention_mask`` None (plain causal) or the
    ``[batch, 1, length, length]`` mask transformers built (padding, packed examples);
    returns ``[batch, length, heads, dim]``.

    Outside training, with a cache, or for rows that do not split into whole groups of an
    even size (``group_ratio`` of the row), it is full attention."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    length = query.shape[2]
    group = round(length * getattr(module.config, "longlora_group_ratio", 0.25))
    if not module.training or key.shape[2] != length or group == length:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if group < 2 or group % 2 or length % group:
        warn_once(
            f"LongLoRA: rows of {length} tokens do not split into groups of {group}; they get full attention (pack rows, or pad them to a multiple of 2 / group_ratio)"
        )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    keep = None
    if attention_mask is not None:
        keep = (
            attention_mask
            if attention_mask.dtype == torch.bool
            else attention_mask > torch.finfo(attention_mask.dtype).min / 2
        )
    repeats = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    half = query.shape[1] // 2
    options = {"group": group, "scale": scaling, "dropout": dropout, "keep": keep}
    plain = grouped_attention(query[:, :half], key[:, :half], value[:, :half], shift=0, **options)
    shifted = grouped_attention(query[:, half:], key[:, half:], value[:, half:], shift=group // 2, **options)
    return torch.cat([plain, shifted], dim=1).transpose(1, 2).contiguous(), None


def grouped_attention(
    query: Any, key: Any, value: Any, *, group: int, shift: int, scale: float | None, dropout: float, keep: Any
) -> Any:
    """Causal attention within groups of ``group`` tokens whose boundaries are moved
    ``shift`` tokens later; ``[batch, heads, length, dim]`` in and out. ``keep``
    (``[batch, 1, length, length]``, True where a query may see a key) narrows it further."""
    import torch
    import torch.nn.functional as F

    batch, heads, length, dim = query.shape
    front = group - shift if shift else 0  # padding so that the shifted boundaries fall on whole groups
    if shift:
        query, key, value = (F.pad(tensor, (0, 0, front, shift)) for tensor in (query, key, value))
    padded = query.shape[2]
    groups = padded // group

    def split(tensor: Any) -> Any:  # [b, h, n*g, d] -> [b*n, h, g, d]
        return (
            tensor.reshape(batch, heads, groups, group, dim).transpose(1, 2).reshape(batch * groups, heads, group, dim)
        )

    mask = None
    if keep is not None:
        if shift:
            keep = F.pad(keep, (front, shift, front, shift), value=False)
        # the diagonal blocks of the whole mask: [b, h', n, g, n, g] -> [b*n, h', g, g]
        blocks = (
            keep.reshape(batch, keep.shape[1], groups, group, groups, group)
            .diagonal(dim1=2, dim2=4)
            .permute(0, 4, 1, 2, 3)
        )
        # padding sees itself, not NaN
        mask = blocks.reshape(batch * groups, keep.shape[1], group, group) | torch.eye(
            group, dtype=torch.bool, device=query.device
        )
    elif shift:
        real = torch.zeros(padded, dtype=torch.bool, device=query.device)
        real[front : front + length] = True
        real = real.view(groups, group)
        causal = torch.ones(group, group, dtype=torch.bool, device=query.device).tril()
        # a real query sees real keys before it; a padding query sees padding (its output is dropped)
        mask = causal & (real[:, None, :] | ~real[:, :, None])
        mask = mask[None, :, None].expand(batch, groups, 1, group, group).reshape(batch * groups, 1, group, group)
    out = F.scaled_dot_product_attention(
        split(query), split(key), split(value), attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scale
    )
    out = out.reshape(batch, groups, heads, group, dim).transpose(1, 2).reshape(batch, heads, padded, dim)
    return out[:, :, front : front + length]
