"""Sequential (layer-by-layer) calibration of a causal language model.

The inputs of the first decoder layer are captured once with a forward pre-hook that records the
hidden states and every other argument the model passes to the layer (attention mask, position
ids, ``position_embeddings`` (cos, sin), ``cache_position``, cache settings...), then stops the
forward. Each layer is then run on its own, batch by batch, on those inputs; running it once more
after pruning it overwrites the buffer with the next layer's inputs. Only one layer's activations
exist at a time: the buffer is ``num_samples x seq_len x hidden`` in the model's dtype, however
long a context the model's config allows.

Example::

    inputs = capture_inputs(model, layers[0].module, input_ids, batch_size=4)
    for layer in layers:
        inputs.run(layer.module)        # hooks on the layer's linears see every sample
        ...                             # prune the layer
        inputs.advance(layer.module)    # the buffer now holds the next layer's inputs
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.criteria import needs_data
from core.errors import InvalidSpec
from core.pruning.base import PruneContext
from core.spec import PruningSpec


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward once the first layer's inputs are known."""


class StopForward(Exception):
    """Raised by a hook once a forward has given all that is wanted of it: :meth:`LayerInputs.run`
    goes on with the next batch, and the rest of the layer is not computed."""


@dataclass
class _Call:
    """How the model called the first decoder layer for samples ``start:stop``: the positional
    arguments after the hidden states, and the keyword arguments."""

    start: int
    stop: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool


@dataclass
class LayerInputs:
    """The inputs of the current decoder layer for every calibration sample.

    ``hidden`` is ``(num_samples, seq_len, hidden_size)`` and is overwritten in place by
    :meth:`advance`; ``calls`` say how each batch is passed to a layer.
    """

    hidden: torch.Tensor  # (N, T, H)
    calls: list[_Call] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0] * self.hidden.shape[1])

    def kwargs(self, index: int = 0) -> dict[str, Any]:
        """The keyword arguments batch ``index`` is called with."""
        return self.calls[index].kwargs

    def _forward(self, layer: nn.Module, call: _Call) -> torch.Tensor:
        hidden = self.hidden[call.start : call.stop]
        if call.hidden_as_kwarg:
            out = layer(*call.args, hidden_states=hidden, **call.kwargs)
        else:
            out = layer(hidden, *call.args, **call.kwargs)
        # Layers return the hidden states, or a tuple that starts with them.
        result = out[0] if isinstance(out, (tuple, list)) else out
        assert isinstance(result, torch.Tensor)
        return result

    @torch.no_grad()
    def run(self, layer: nn.Module, batches: int | None = None, *, start: int = 0) -> None:
        """Run ``layer`` on batches ``start:batches`` (default: all) and discard the outputs
        (hooks collect statistics; a hook may end a batch's forward with :class:`StopForward`)."""
        for call in self.calls[start:batches]:
            try:
                self._forward(layer, call)
            except StopForward:
                continue

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> None:
        """Replace the buffer with ``layer``'s outputs: the inputs of the layer after it."""
        for call in self.calls:
            out = self._forward(layer, call)
            self.hidden[call.start : call.stop].copy_(out)


def _same(a: Any, b: Any) -> bool:
    """Whether two captured arguments are equal (tensors by value), so batches can share one."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and type(a) in (int, float, bool, str) and a == b)


def _dedupe(value: Any, previous: Any) -> Any:
    """``previous`` when equal to ``value`` (one copy of cos/sin for all batches), else
    ``value``."""
    return previous if previous is not None and _same(value, previous) else value


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def capture_inputs(
    model: nn.Module, first_layer: nn.Module, input_ids: torch.Tensor, *, batch_size: int
) -> LayerInputs:
    """The inputs of ``first_layer`` for every row of ``input_ids`` (``(N, T)`` token ids).

    The model runs in eval mode with ``use_cache=False``, ``batch_size`` rows at a time, and each
    forward stops at the first decoder layer.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (num_samples, seq_len), got {tuple(input_ids.shape)}")
    samples = int(input_ids.shape[0])
    device = next(model.parameters()).device  # where the embeddings take their ids
    hidden: torch.Tensor | None = None
    calls: list[_Call] = []
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal hidden
        kwargs = dict(kwargs)
        as_kwarg = not args
        states = kwargs.pop("hidden_states") if as_kwarg else args[0]
        rest = args if as_kwarg else args[1:]
        assert isinstance(states, torch.Tensor)
        if hidden is None:
            # (N, T, H): sized from the calibration data, never from the model's context length.
            hidden = states.new_empty((samples, *states.shape[1:]))
        start = calls[-1].stop if calls else 0
        stop = start + int(states.shape[0])
        hidden[start:stop].copy_(states)
        for key, value in kwargs.items():
            kwargs[key] = seen[key] = _dedupe(value, seen.get(key))
        calls.append(_Call(start, stop, tuple(rest), kwargs, as_kwarg))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _eval_mode(model):
            for start in range(0, samples, batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _Captured:
                    continue
                raise RuntimeError("the model never called its first decoder layer")
    finally:
        handle.remove()
    assert hidden is not None  # at least one sample
    return LayerInputs(hidden, calls)


def calibration_ids(spec: PruningSpec, ctx: PruneContext) -> torch.Tensor | None:
    """The ``(N, T)`` token ids data-aware criteria calibrate on (the first calibration tensor;
    an attention mask after it is not used: blocks are full token runs)."""
    if not needs_data(spec.criterion):
        return None
    if not ctx.calibration:
        raise InvalidSpec(
            f"criterion {spec.criterion!r} needs calibration data (token ids, samples x seq_len)"
        )
    ids = ctx.calibration[0]
    if ids.dim() != 2 or ids.is_floating_point():
        raise InvalidSpec(
            f"calibration for {spec.criterion!r} must be integer token ids (samples x seq_len), "
            f"got {ids.dtype} {tuple(ids.shape)}"
        )
    return ids
