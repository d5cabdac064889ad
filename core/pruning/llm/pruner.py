"""The ``hf`` pruner at ``unstructured`` and ``n:m``: magnitude, Wanda and SparseGPT.

The model it is handed is a ``transformers`` causal LM (``PreTrainedModel``), or any object whose
``.model`` attribute holds one (the ``hf`` format's loaded model); weights are zeroed (and, for
SparseGPT, updated) in place and the same object is returned in the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from core.allocation import allocate
from core.errors import InvalidSpec, PruningError
from core.formats.base import ModelInfo
from core.metrics import sparse_size_bytes
from core.pruning.base import LayerResult, PruneContext, PruneOutcome
from core.pruning.llm.calibrate import calibration_ids
from core.pruning.llm.layers import Linear, prunable_linears, unwrap
from core.pruning.llm.masks import planned_removals
from core.pruning.llm.sequential import CRITERIA, prune_causal_lm
from core.pruning.llm.sparsegpt import BLOCK
from core.schedule import at_fraction
from core.spec import PruningSpec


class LanguageModelPruner:
    """Zeroes weights of the linear layers inside a causal LM's decoder layers.

    ``magnitude`` and ``wanda`` remove ``round(s x in)`` weights of every output row (n:m: the
    lowest ``m - n`` of every run of ``m`` input features); ``sparsegpt`` removes
    ``round(s x out x 128)`` weights of every block of 128 input columns and updates the rest.
    Data-aware criteria calibrate sequentially on ``ctx.calibration[0]``, the ``(N, T)`` token
    ids. ``scope: global`` is refused: these criteria compare weights within a row.

    A dry run changes nothing and runs no forward pass: each layer's removals follow from its
    shape (exact for a layer without zeros; with zeros already, at most that many are new).
    """

    format: ClassVar[str] = "hf"
    granularities: ClassVar[frozenset[str]] = frozenset({"unstructured", "n:m"})

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    def preflight(self, spec: PruningSpec, layers: Mapping[str, int]) -> None:
        if spec.criterion not in CRITERIA:
            raise InvalidSpec(
                f"criterion {spec.criterion!r} does not prune language models at "
                f"{spec.granularity!r}; use one of: {', '.join(sorted(CRITERIA))}"
            )
        if spec.scope == "global":
            raise InvalidSpec(
                f"scope 'global' is not available for {spec.criterion!r} on 'hf' models: it "
                "ranks weights within each output row; use scope 'layer' (and layer_sparsity "
                "for per-layer ratios)"
            )
        if spec.granularity == "n:m" and spec.layer_sparsity:
            raise InvalidSpec(
                "layer_sparsity does not apply to n:m, a fixed pattern; use exclude to leave "
                "layers dense"
            )
        allocate(spec, layers)

    def round_spec(self, spec: PruningSpec, before: float, after: float) -> PruningSpec:
        # Weights already zero rank lowest, so each round ranks again at the absolute ratio
        # reached so far: the rounds are nested.
        return at_fraction(spec, after)

    def prune(
        self, model: Any, info: ModelInfo, spec: PruningSpec, ctx: PruneContext
    ) -> PruneOutcome:
        net = unwrap(model)
        linears = _layers(net, info)
        sizes = {name: lin.weight.numel() for name, lin in linears.items()}
        self.preflight(spec, sizes)
        allocation = allocate(spec, sizes)
        ratios = {name: ratio for name, ratio in allocation.per_layer.items() if ratio > 0}
        n_m = spec.n_m if spec.granularity == "n:m" else None
        block = BLOCK if spec.criterion == "sparsegpt" else None
        nonzero_before = {name: int(lin.weight.count_nonzero()) for name, lin in linears.items()}
        details: dict[str, Any] = {"criterion": spec.criterion}
        if ctx.dry_run:
            planned = {
                name: planned_removals(linears[name].shape, ratio, n_m, block=block)
                for name, ratio in ratios.items()
            }
        else:
            planned = {}
            input_ids = calibration_ids(spec, ctx)
            results = prune_causal_lm(
                net,
                ratios,
                criterion=spec.criterion,
                n_m=n_m,
                input_ids=input_ids,
                batch_size=self.batch_size,
            )
            if input_ids is not None:
                details["calibration"] = {
                    "num_samples": int(input_ids.shape[0]),
                    "seq_len": int(input_ids.shape[1]),
                }
            errors = {n: r.error for n, r in results.items() if r.error is not None}
            if errors:
                details["reconstruction_error"] = errors
        kinds = {layer.name: layer.kind for layer in info.prunable_layers}
        layers = []
        for name, linear in linears.items():
            params = linear.weight.numel()
            nonzero = int(linear.weight.count_nonzero())
            if name in planned:
                nonzero = min(nonzero, params - planned[name])
            layers.append(
                LayerResult(
                    name=name,
                    kind=kinds.get(name, "conv1d" if linear.transposed else "linear"),
                    shape_before=linear.shape,  # (out, in), as ModelInfo states it
                    shape_after=linear.shape,
                    params=params,
                    nonzero=nonzero,
                    sparsity=1.0 - nonzero / max(params, 1),
                )
            )
        newly_zero = sum(nonzero_before[lr.name] - lr.nonzero for lr in layers) if planned else 0
        parameters = dict(net.named_parameters())  # tied tensors once
        return PruneOutcome(
            model=model,
            layers=tuple(layers),
            params_after=sum(p.numel() for p in parameters.values()),
            nonzero_params_after=sum(int(p.count_nonzero()) for p in parameters.values())
            - newly_zero,
            sparse_size_bytes=sparse_size_bytes(
                {n: p.detach() for n, p in parameters.items()},
                (f"{name}.weight" for name in linears),
            ),
            excluded=allocation.excluded,
            details=details,
        )

    def hold_zeros(self, model: Any, info: ModelInfo) -> Callable[[Any], None]:
        keep = {
            name: lin.weight.detach() != 0 for name, lin in _layers(unwrap(model), info).items()
        }

        def restore(retrained: Any) -> None:
            linears = prunable_linears(unwrap(retrained))
            with torch.no_grad():
                for name, mask in keep.items():
                    weight = linears[name].weight
                    weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))

        return restore


def _layers(model: torch.nn.Module, info: ModelInfo) -> dict[str, Linear]:
    """The prunable linears, in the order ``info`` lists them when it does (checked against the
    model), else in model order."""
    found = prunable_linears(model)
    if not info.prunable_layers:
        return found
    missing = [layer.name for layer in info.prunable_layers if layer.name not in found]
    if missing:
        raise PruningError(
            f"prunable layers {missing[:5]} are not linear layers inside the decoder layers of "
            f"the model; those are: {', '.join(list(found)[:8])}..."
        )
    return {layer.name: found[layer.name] for layer in info.prunable_layers}
