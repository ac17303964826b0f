"""Different LoRA adapters in one denoiser call: the base weights run once for every row, and each
adapter's low-rank delta is added to the rows that use it, with each row's own scale.

peft's own mixed-batch inference (``adapter_names`` per row) takes one adapter per row at its
global scale; a request here names several adapters, each with its scale. So the denoiser's peft
layers stay disabled (peft then runs only the base layer), and a forward hook on each layer adds

    out += B_cat( A_cat(x) * S )

where ``A_cat`` / ``B_cat`` are the layer's ``lora_A`` / ``lora_B`` weights of the adapters in
the call, concatenated along the rank, and ``S`` (rows x total rank) holds, for each row, each
adapter's ``scale * lora_alpha / r`` (what ``set_adapters`` gives peft) over that adapter's rank
columns and 0 elsewhere. That is two matrix products per layer whatever the number of adapters,
equal to diffusers' ``set_adapters`` path up to rounding (the sum runs in one product).
Convolution layers (LoCon) add each adapter's delta in turn.

Adapters this cannot serve exactly (DoRA and other peft variants, a bias on ``lora_B``, layer
types other than Linear and Conv2d) are *exclusive*: their images run in calls of their own
adapter set, through peft's own path (:meth:`BatchedLoRA.exclusive`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora_layers

AdapterSet = tuple[tuple[str, float], ...]  # (adapter name, scale), as a request names them
COMBINATIONS_KEPT = 8  # concatenated weights kept per layer: one per mix of adapters in recent calls


@dataclass(frozen=True)
class RowPlan:
    """The adapters of one call: their names, and each row's scale of each (rows x names)."""

    names: tuple[str, ...]
    scales: torch.Tensor

    @classmethod
    def of(cls, rows: list[AdapterSet], device: torch.device) -> "RowPlan":
        names = tuple(sorted({name for adapters in rows for name, _ in adapters}))
        index = {name: i for i, name in enumerate(names)}
        scales = torch.zeros(len(rows), len(names), dtype=torch.float32)
        for r, adapters in enumerate(rows):
            for name, scale in adapters:
                scales[r, index[name]] = scale
        return cls(names, scales.to(device))


@dataclass(frozen=True)
class _Weights:
    """One layer's LoRA weights for the adapters of a call, ready to use."""

    adapters: tuple[int, ...]  # indices into RowPlan.names of the adapters this layer has
    ranks: tuple[int, ...]
    base_scales: tuple[float, ...]  # lora_alpha / r (or / sqrt(r) with rsLoRA) of each
    a: list[torch.nn.Module]  # the lora_A modules
    b: list[torch.nn.Module]  # the lora_B modules
    a_cat: torch.Tensor | None = None  # Linear layers: A weights concatenated (total rank x in)
    b_cat: torch.Tensor | None = None  # and B weights (out x total rank)


def _base_scale(layer: LoraLayer, name: str) -> float:
    # as peft's set_scale(name, 1.0) computes it: scale * alpha / r
    r = layer.r[name]
    return 1.0 * layer.lora_alpha[name] / (r**0.5 if layer.use_rslora.get(name, False) else r)


def servable(layer: LoraLayer, name: str) -> bool:
    """Can the batched path add adapter ``name``'s delta on this layer exactly as peft would?"""
    if name not in layer.lora_A:
        return True  # the adapter does not touch this layer
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return False  # DoRA and other variants rescale the base output
    if getattr(layer, "lora_bias", {}).get(name, False) or getattr(layer, "fan_in_fan_out", False):
        return False
    return type(layer) in (lora_layers.Linear, lora_layers.Conv2d)


class BatchedLoRA:
    """The per-row LoRA path of one denoiser (owned by the worker thread)."""

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser
        self.plan: RowPlan | None = None
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._weights: dict[int, OrderedDict] = {}  # id(layer) -> names -> _Weights
        self._scales: dict[tuple, torch.Tensor] = {}  # within a call: a layer's columns' scales
        self.refresh()

    def layers(self) -> list[LoraLayer]:
        return [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]

    def refresh(self) -> None:
        """After adapters were loaded or deleted: hook new layers, forget concatenated weights,
        and keep peft's own path off (the hooks add the deltas)."""
        layers = self.layers()
        live = {id(layer) for layer in layers}
        for key in [k for k in self._hooks if k not in live]:
            self._hooks.pop(key).remove()
        for layer in layers:
            if id(layer) not in self._hooks:
                self._hooks[id(layer)] = layer.register_forward_hook(self._add_deltas)
            layer.enable_adapters(False)
        self._weights.clear()

    def servable(self, name: str) -> bool:
        return all(servable(layer, name) for layer in self.layers())

    @contextlib.contextmanager
    def rows(self, rows: list[AdapterSet], device: torch.device):
        """Within this block, denoiser calls add row i's adapters (``rows[i]``) to row i."""
        outer, scales = self.plan, self._scales  # a block inside another (a call of part of its rows)
        self.plan = RowPlan.of(rows, device) if any(rows) else None
        self._scales = {}
        try:
            yield
        finally:
            self.plan, self._scales = outer, scales

    @contextlib.contextmanager
    def exclusive(self, adapters: AdapterSet):
        """Within this block, peft's own path runs ``adapters`` on every row (for adapters the
        batched path cannot serve); afterwards it is off again."""
        self.denoiser.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        for layer in self.layers():
            layer.enable_adapters(True)
        try:
            yield
        finally:
            for layer in self.layers():
                layer.enable_adapters(False)

    # -- inside the denoiser ----------------------------------------------------------------
    def _add_deltas(self, layer: LoraLayer, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        plan = self.plan
        if plan is None:
            return None
        weights = self._layer_weights(layer, plan.names)
        if not weights.adapters:
            return None
        x = args[0]
        rows = plan.scales.shape[0]
        if x.shape[0] != rows:
            raise RuntimeError(f"a LoRA layer got {x.shape[0]} rows in a call of {rows}")
        key = (weights.adapters, weights.ranks, weights.base_scales)
        columns = self._scales.get(key)
        if columns is None:  # most layers share ranks and alphas: computed once per call
            device = plan.scales.device
            per_adapter = plan.scales[:, list(weights.adapters)] * torch.tensor(weights.base_scales, device=device)
            columns = per_adapter.repeat_interleave(torch.tensor(weights.ranks, device=device), dim=1)
            self._scales[key] = columns
        if weights.a_cat is not None and weights.a_cat.device == x.device:
            x = x.to(weights.a_cat.dtype)
            h = torch.nn.functional.linear(x, weights.a_cat)
            h = h * columns.to(h.dtype).view(rows, *([1] * (h.dim() - 2)), -1)
            return out + torch.nn.functional.linear(h, weights.b_cat).to(out.dtype)
        # Conv2d (LoCon), or weights an offloading hook moves at call time: each adapter in turn
        channels_first = isinstance(layer, lora_layers.Conv2d)  # (rows, rank, h, w), else (rows, ..., rank)
        shape = (rows, -1, *([1] * (x.dim() - 2))) if channels_first else (rows, *([1] * (x.dim() - 2)), -1)
        start = 0
        for a, b, r in zip(weights.a, weights.b, weights.ranks):
            h = a(x.to(a.weight.dtype))
            h = h * columns[:, start : start + r].to(h.dtype).view(shape)
            out = out + b(h).to(out.dtype)
            start += r
        return out

    def _layer_weights(self, layer: LoraLayer, names: tuple[str, ...]) -> _Weights:
        cache = self._weights.setdefault(id(layer), OrderedDict())
        if names in cache:
            cache.move_to_end(names)
            return cache[names]
        present = [(i, name) for i, name in enumerate(names) if name in layer.lora_A]
        a = [layer.lora_A[name] for _, name in present]
        b = [layer.lora_B[name] for _, name in present]
        weights = _Weights(tuple(i for i, _ in present), tuple(layer.r[n] for _, n in present),
                           tuple(_base_scale(layer, n) for _, n in present), a, b)
        devices = {m.weight.device for m in a + b}
        if isinstance(layer, lora_layers.Linear) and len(devices) == 1 and devices != {torch.device("meta")}:
            weights = dataclasses.replace(weights, a_cat=torch.cat([m.weight for m in a]),
                                          b_cat=torch.cat([m.weight for m in b], dim=1))
        cache[names] = weights
        if len(cache) > COMBINATIONS_KEPT:
            cache.popitem(last=False)
        return weights
