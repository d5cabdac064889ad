"""Scoring a program on a dataset: accuracy and top-k for classification, MSE for regression.

Example::

    import torch
    from core.data import load_dataset, match_program, batch_range
    from core.evaluate import evaluate
    from core.formats.pt2.program import load_program
    from core.spec import EvaluationSpec

    program, info = load_program("model.pt2")
    data = match_program(load_dataset("test.npz"), info.inputs)
    print(evaluate(program.module(), data, EvaluationSpec(), batch_range(info.inputs)))
    # {'accuracy': 0.97, 'top5_accuracy': 1.0, 'loss': 0.11, 'num_samples': 360.0}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from core.data import BatchRange, Dataset
from core.errors import DatasetMismatch
from core.spec import EvaluationSpec

__all__ = ["evaluate", "first_tensor", "is_classification"]


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a loss is computed on: the output itself, or the first tensor it holds."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(output, dict):
        for item in output.values():
            if isinstance(item, torch.Tensor):
                return item
    raise DatasetMismatch(f"the model returned no tensor to score ({type(output).__name__})")


def is_classification(targets: torch.Tensor, task: str = "auto") -> bool:
    """Integer targets are class indices; floating ones are regression values (``auto``)."""
    if task != "auto":
        return task == "classification"
    return not targets.dtype.is_floating_point


def check_targets(output: torch.Tensor, targets: torch.Tensor, classification: bool) -> None:
    """Refuse targets that cannot be scored against ``output`` with a message naming both."""
    out_shape, t_shape = tuple(output.shape), tuple(targets.shape)
    if classification:
        if targets.dtype.is_floating_point:
            raise DatasetMismatch(
                f"classification needs integer class indices as targets; they are {targets.dtype}"
            )
        if output.dim() < 2 or t_shape[1:] != out_shape[2:]:
            raise DatasetMismatch(
                f"targets of shape [*{list(t_shape[1:])}] do not fit the model's output of shape "
                f"[*{list(out_shape[1:])}] for classification (expected [*{list(out_shape[2:])}])"
            )
        classes = out_shape[1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise DatasetMismatch(
                f"targets range over [{low}, {high}] but the model has {classes} outputs "
                f"(classes 0..{classes - 1})"
            )
    elif t_shape[1:] != out_shape[1:]:
        raise DatasetMismatch(
            f"regression targets of shape [*{list(t_shape[1:])}] do not match the model's output "
            f"of shape [*{list(out_shape[1:])}]"
        )


def eval_batches(n: int, batch_size: int, limits: BatchRange) -> Iterator[tuple[slice, int]]:
    """Consecutive slices covering ``range(n)``, each with how many padded rows it needs so the
    program accepts it (a last batch below the program's minimum is padded, then cut off)."""
    size = limits.clamp(batch_size)
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield slice(start, stop), max(0, limits.min - (stop - start))


def _pad(t: torch.Tensor, extra: int) -> torch.Tensor:
    if extra == 0:
        return t
    return torch.cat([t, t[:1].expand(extra, *t.shape[1:])])


@torch.no_grad()
def evaluate(
    module: torch.nn.Module | Any,
    data: Dataset,
    spec: EvaluationSpec,
    limits: BatchRange,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Score ``module`` (in the mode its graph was exported in) on ``data``.

    Returns ``accuracy`` (top-1), ``top{k}_accuracy`` (when the model has more than k classes),
    ``loss`` (mean cross-entropy) and ``num_samples`` for classification; ``loss`` and ``mse``
    (the same mean squared error) and ``num_samples`` for regression.

    Raises:
        DatasetMismatch: no targets, or targets that do not fit the model's output.
    """
    if data.targets is None:
        raise DatasetMismatch("evaluation needs a dataset with targets")
    n = data.num_samples if spec.max_samples is None else min(spec.max_samples, data.num_samples)
    classification = is_classification(data.targets, spec.task)
    dev = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    loss_sum = correct = top_k_correct = elements = 0.0
    k = spec.top_k
    classes = 0
    checked = False
    for rows, pad in eval_batches(n, spec.batch_size, limits):
        inputs = [_pad(t[rows], pad).to(dev) for t in data.inputs]
        targets = data.targets[rows].to(dev)
        with autocast:
            output = first_tensor(module(*inputs))
        output = output[: output.shape[0] - pad].float()
        if not checked:
            check_targets(output, data.targets[:n], classification)
            checked = True
        if classification:
            classes = output.shape[1]
            elements += targets.numel()  # one per sample, or per position for dense outputs
            loss_sum += float(F.cross_entropy(output, targets.long(), reduction="sum"))
            correct += float((output.argmax(1) == targets).sum())
            if classes > k:
                top = output.topk(k, dim=1).indices
                top_k_correct += float((top == targets.unsqueeze(1)).any(1).sum())
        else:
            err = (output - targets.to(output.dtype)) ** 2
            loss_sum += float(err.reshape(err.shape[0], -1).mean(1).sum())
    result = {"loss": loss_sum / (elements if classification else n), "num_samples": float(n)}
    if classification:
        result["accuracy"] = correct / elements
        if classes > k:
            result[f"top{k}_accuracy"] = top_k_correct / elements
    else:
        result["mse"] = result["loss"]
    return result
