"""Denoiser forwards that run part of the model, for features reused between steps
(``feature_cache.py``). Each follows the model's own ``forward`` in diffusers step for step, with
the model's own modules, and leaves out only what the cached features stand for.

* :func:`unet_shallow`: DeepCache's cached step of a ``UNet2DConditionModel``: the embeddings,
  ``conv_in`` and the first down block (their outputs are the skip connections the last up block
  reads), then the last up block on the feature cached at the last full step, and the output layers.
* :func:`sd3_first_block`, :func:`flux_first_block`: an ``SD3Transformer2DModel`` /
  ``FluxTransformer2DModel`` forward with First Block Cache per row: the first block for every row;
  the other blocks only for the rows that need them (the others add the residual those blocks
  added at their last full step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def last_up_block_input(unet) -> tuple[Callable[[], torch.Tensor | None], Any]:
    """A hook that keeps what enters the last up block in a full forward: (read it, the handle)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, kwargs):
        seen["input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
    return (lambda: seen.get("input")), handle


def unet_shallow(unet, sample: torch.Tensor, timestep: torch.Tensor, deep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, timestep_cond: torch.Tensor | None = None,
                 added_cond_kwargs: dict | None = None, cross_attention_kwargs: dict | None = None) -> torch.Tensor:
    """The UNet's output with ``deep`` (rows, C, H, W) in place of everything below the first down
    block: ``UNet2DConditionModel.forward``'s own steps, the deep blocks left out."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs or {})
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=added_cond_kwargs or {})
    sample = unet.conv_in(sample)
    first = unet.down_blocks[0]
    if getattr(first, "has_cross_attention", False):
        _, res = first(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                       cross_attention_kwargs=cross_attention_kwargs)
    else:
        _, res = first(hidden_states=sample, temb=emb)
    last = unet.up_blocks[-1]
    skips = ((sample,) + res)[: len(last.resnets)]  # what the full forward leaves for the last up block
    if getattr(last, "has_cross_attention", False):
        out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips,
                   encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)
    else:
        out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)


def _first_block_cached(blocks, hidden: torch.Tensor, encoder: torch.Tensor, per_row: dict[str, torch.Tensor],
                        shared: dict[str, Any], decide: Callable[[torch.Tensor], list[int]],
                        store: Callable[[list[int], torch.Tensor, torch.Tensor], None],
                        reuse: Callable[[list[int]], torch.Tensor], scope: Callable[[list[int]], Any]) -> torch.Tensor:
    """The image states after ``blocks``: the first for every row; the others only for the rows
    ``decide(first block's residual)`` returns, ``store(rows, residual, tail)`` keeping what they
    computed; the other rows add ``reuse(rows)``, their last tail residual. ``per_row`` block
    inputs are taken for the rows that run; ``scope(rows)`` applies those rows' LoRA adapters."""
    before = hidden
    encoder, hidden = blocks[0](hidden_states=hidden, encoder_hidden_states=encoder, **per_row, **shared)
    residual = hidden - before
    compute = decide(residual)
    skip = [r for r in range(hidden.shape[0]) if r not in compute]
    out = hidden.clone()
    if compute:
        index = torch.tensor(compute, device=hidden.device)
        h, e = hidden.index_select(0, index), encoder.index_select(0, index)
        rows = {k: v.index_select(0, index) for k, v in per_row.items()}
        head = h
        with scope(compute):
            for block in blocks[1:]:
                e, h = block(hidden_states=h, encoder_hidden_states=e, **rows, **shared)
        out[index] = h
        store(compute, residual.index_select(0, index), h - head)
    if skip:
        index = torch.tensor(skip, device=hidden.device)
        out[index] = hidden.index_select(0, index) + reuse(skip)
    return out


def sd3_first_block(transformer, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                    **hooks: Any) -> torch.Tensor:
    """``SD3Transformer2DModel.forward`` with First Block Cache per row (``hooks``: decide, store,
    reuse and scope, as :func:`_first_block_cached` takes them)."""
    height, width = hidden_states.shape[-2:]
    hidden = transformer.pos_embed(hidden_states).contiguous()
    temb = transformer.time_text_embed(timestep, pooled_projections)
    encoder = transformer.context_embedder(encoder_hidden_states)
    out = _first_block_cached(transformer.transformer_blocks, hidden, encoder, {"temb": temb}, {}, **hooks)
    out = transformer.proj_out(transformer.norm_out(out, temb))
    patch = transformer.config.patch_size
    out = out.reshape(out.shape[0], height // patch, width // patch, patch, patch, transformer.out_channels)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(out.shape[0], transformer.out_channels, height, width)


def flux_first_block(transformer, hidden_states: torch.Tensor, timestep: torch.Tensor,
                     encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                     guidance: torch.Tensor | None, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                     **hooks: Any) -> torch.Tensor:
    """``FluxTransformer2DModel.forward`` over packed tokens with First Block Cache per row: the
    double-stream and single-stream blocks are one chain, the first double block its head."""
    hidden = transformer.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is None:
        temb = transformer.time_text_embed(timestep, pooled_projections)
    else:
        temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
    encoder = transformer.context_embedder(encoder_hidden_states)
    rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    out = _first_block_cached(blocks, hidden, encoder, {"temb": temb},
                              {"image_rotary_emb": rotary, "joint_attention_kwargs": None}, **hooks)
    return transformer.proj_out(transformer.norm_out(out, temb))
