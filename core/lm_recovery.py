"""Perplexity and fine-tuning of a causal language model on blocks of token ids.

Works on any ``torch.nn.Module`` called as ``model(input_ids=ids, use_cache=False)`` that returns
an object with ``.logits`` of shape ``(B, T, vocab)`` (a transformers ``...ForCausalLM``) or the
logits themselves. Blocks come from :func:`core.text.token_blocks`: ``[N, seq_len]`` int64.

**Perplexity** (:func:`evaluate_perplexity`) is ``exp`` of the mean next-token negative
log-likelihood over all predicted tokens: every block is scored on its own (no context carried
over from the block before), so each contributes ``seq_len - 1`` predictions.

**Fine-tuning** (:func:`fine_tune_lm`) trains the model in place with the optimizer, learning-rate
schedule (linear warm-up, then cosine or constant), data order and checkpoints of
:mod:`core.finetune`, on one of two losses:

* ``causal_lm``: next-token cross-entropy;
* ``distillation``: ``alpha x T^2 x KL(teacher || student)`` over the next-token distributions
  softened at ``temperature`` T, plus ``(1 - alpha) x`` next-token cross-entropy. The teacher is
  the dense model: either a module (used as given, frozen, moved to the device) or a state dict
  loaded into a copy of the student (only possible while the shapes still match, i.e. after
  unstructured or n:m pruning; give a module after width or depth pruning).

Weights named in ``masked`` keep their zeros: the zero pattern is taken before training, gradients
are masked before every step and the weights after it (weight decay and momentum would otherwise
revive them). On CUDA the forward runs under bf16 autocast with fp32 master weights; on the CPU in
fp32. A model held in another dtype (bf16 checkpoints) is trained in fp32 and cast back at the end.

Example::

    from core.lm_recovery import evaluate_perplexity, fine_tune_lm
    from core.spec import FineTuneSpec
    from core.text import token_blocks

    blocks = token_blocks("train.txt", tokenizer, 512, eos_id)
    print(evaluate_perplexity(model, blocks[:64]))   # {'perplexity': 31.2, 'loss': 3.44, ...}
    fine_tune_lm(model, blocks, FineTuneSpec(steps=200, batch_size=8, lr=1e-4, loss="causal_lm"),
                 masked=[n for n, _ in model.named_parameters() if n.endswith("proj.weight")])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from core.data import BatchRange
from core.device import pick_device
from core.errors import DatasetMismatch, InvalidSpec
from core.finetune import (
    Checkpointing,
    FineTuneResult,
    StepCallback,
    _after_step,
    _epoch_order,
    _fingerprint,
    _lr_at,
    _optimizer,
    _Progress,
    _restore,
    _save,
    plan_steps,
)
from core.spec import FineTuneSpec

__all__ = ["evaluate_perplexity", "fine_tune_lm", "lm_logits"]

LM_LOSSES = ("causal_lm", "distillation")


def lm_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits ``(B, T, vocab)`` for ``input_ids`` ``(B, T)``, no KV cache."""
    output = model(input_ids=input_ids, use_cache=False)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise DatasetMismatch(f"the model returned no logits ({type(output).__name__})")
    return logits


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise DatasetMismatch(
            f"language-model data must be blocks of at least 2 tokens, [N, seq_len]; got "
            f"{list(blocks.shape)}"
        )
    if blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise DatasetMismatch(f"token ids must be integers, not {blocks.dtype}")


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``blocks`` (``[N, seq_len]`` token ids), each block on its own.

    The model is moved to ``device`` (default: CUDA when available, else CPU) and left there; it
    is scored in eval mode and returned to the mode it was in.

    Returns:
        ``{"perplexity", "loss", "num_tokens", "seq_len"}``: ``loss`` is the mean next-token
        negative log-likelihood (nats) over ``num_tokens = N x (seq_len - 1)`` predictions and
        ``perplexity = exp(loss)``.

    Raises:
        DatasetMismatch: ``blocks`` is not ``[N, seq_len >= 2]`` integers, or holds an id the
            model's embedding does not have.
    """
    _check_blocks(blocks)
    _check_vocab(model, blocks)
    dev = pick_device(str(device) if device is not None else None)
    was_training = model.training
    model.to(dev)
    model.eval()
    nll = 0.0
    count = 0
    try:
        for start in range(0, blocks.shape[0], max(1, batch_size)):
            ids = blocks[start : start + batch_size].to(dev, dtype=torch.long)  # (B, T)
            with _autocast(dev):
                logits = lm_logits(model, ids)  # (B, T, V)
            # One row at a time in fp32: (T-1) x V floats, not B x (T-1) x V, at once.
            for row in range(ids.shape[0]):
                nll += float(
                    F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum")
                )
            count += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        model.train(was_training)
    loss = nll / count
    return {
        "perplexity": math.exp(loss) if loss < 709 else math.inf,
        "loss": loss,
        "num_tokens": float(count),
        "seq_len": float(blocks.shape[1]),
    }


def _check_vocab(model: torch.nn.Module, blocks: torch.Tensor) -> None:
    """Refuse ids the embedding does not have before any forward (which would fail obscurely)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    weight = getattr(embedding, "weight", None)
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0:
        raise DatasetMismatch(f"token ids must not be negative; found {low}")
    if isinstance(weight, torch.Tensor) and high >= weight.shape[0]:
        raise DatasetMismatch(
            f"token id {high} is outside the model's vocabulary of {weight.shape[0]} tokens"
        )


def _keep_masks(
    model: torch.nn.Module, masked: Mapping[str, torch.Tensor] | Sequence[str]
) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    """name -> (parameter, boolean mask of the entries that may be non-zero)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    names = list(masked) if not isinstance(masked, Mapping) else list(masked.keys())
    for name in names:
        if name not in params:
            raise InvalidSpec(f"masked weight {name!r} is not a parameter of the model")
        param = params[name]
        if isinstance(masked, Mapping):
            keep = masked[name].to(param.device, dtype=torch.bool)
            if keep.shape != param.shape:
                raise InvalidSpec(
                    f"the mask of {name!r} has shape {list(keep.shape)}, the weight "
                    f"{list(param.shape)}"
                )
        else:
            keep = param.detach() != 0
        masks[name] = (param, keep)
    return masks


def _teacher_module(
    student: torch.nn.Module, teacher: torch.nn.Module | Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    if isinstance(teacher, torch.nn.Module):
        return teacher
    module = copy.deepcopy(student)
    try:
        module.load_state_dict(dict(teacher), strict=True)
    except RuntimeError as exc:
        raise InvalidSpec(
            "the teacher's state dict does not fit the pruned model (its shapes changed); pass "
            f"the dense model itself as the teacher: {exc}"
        ) from exc
    return module


def _parameters_to_fp32(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.dtype]]:
    """Cast floating parameters (not buffers: RoPE's ``inv_freq`` stays as it is) to fp32 in
    place; returns those cast, with their dtype, to cast back after training."""
    cast = []
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                cast.append((param, param.dtype))
                param.data = param.data.float()
    return cast


def _lm_loss(
    spec: FineTuneSpec, logits: torch.Tensor, ids: torch.Tensor, soft: torch.Tensor | None
) -> torch.Tensor:
    vocab = logits.shape[-1]
    pred = logits[:, :-1].reshape(-1, vocab).float()  # (B*(T-1), V): position t predicts t+1
    ce = F.cross_entropy(pred, ids[:, 1:].reshape(-1))
    if spec.loss == "causal_lm":
        return ce
    assert soft is not None
    t = spec.temperature
    # KL(teacher || student) per predicted token, x T^2 so the gradients keep the magnitude of a
    # hard-label loss whatever the temperature (Hinton et al.).
    kl = F.kl_div(
        F.log_softmax(pred / t, dim=-1),
        F.log_softmax(soft[:, :-1].reshape(-1, vocab).float() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    if spec.alpha < 1.0:
        return spec.alpha * kl + (1.0 - spec.alpha) * ce
    return kl


def _accumulate(
    progress: _Progress,
    loss: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    soft: torch.Tensor | None,
) -> None:
    rows = ids.shape[0]
    progress.loss_sum += float(loss.detach()) * rows
    progress.count += rows
    with torch.no_grad():
        guess = logits[:, :-1].argmax(-1)  # (B, T-1)
        progress.correct += float((guess == ids[:, 1:]).float().mean()) * rows
        if soft is not None:
            progress.agree += float((guess == soft[:, :-1].argmax(-1)).float().mean()) * rows


def fine_tune_lm(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    spec: FineTuneSpec,
    *,
    masked: Mapping[str, torch.Tensor] | Sequence[str],
    teacher: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    checkpoint: Checkpointing | None = None,
    on_step: StepCallback | None = None,
) -> FineTuneResult:
    """Train the causal LM ``model`` in place on ``blocks`` (``[N, seq_len]`` token ids).

    Args:
        model: the (pruned) model; trained in place, left on ``device`` in the mode it came in.
        blocks: training blocks from :func:`core.text.token_blocks`.
        spec: ``loss`` ``causal_lm`` or ``distillation``; ``epochs`` or ``steps``, ``batch_size``
            in blocks, ``lr``, ``optimizer``, ``schedule``, ``warmup_steps``, ``temperature``,
            ``alpha``, ``seed`` as for other models (``seq_len`` is the caller's, in ``blocks``).
        masked: parameter names whose zeros stay zero (the zero pattern is read now), or a dict
            name -> boolean mask (True: may be non-zero) to hold instead.
        teacher: the dense model for ``distillation``: a module, or a state dict to load into a
            copy of ``model``.
        device: where to train; default CUDA when available (bf16 autocast), else CPU (fp32).
        checkpoint: save the training state there every ``every_steps`` steps; resume from it
            when it exists and belongs to the same training.
        on_step: ``(step, total, summary_or_None)`` before the first step and after every step;
            ``summary`` at the end of each epoch (``epoch``, ``step``, ``total_steps``, ``loss``,
            ``lr``, ``accuracy`` = next-token top-1, ``teacher_agreement`` when distilling). It
            may raise to stop training.

    Raises:
        InvalidSpec: a loss other than ``causal_lm``/``distillation``, distillation without a
            teacher, a masked name the model does not have.
        DatasetMismatch: ``blocks`` is not ``[N, seq_len >= 2]`` integers within the vocabulary.
    """
    if spec.loss not in LM_LOSSES:
        raise InvalidSpec(
            f"loss {spec.loss!r} does not apply to language models; use 'causal_lm' or "
            "'distillation'"
        )
    if spec.loss == "distillation" and teacher is None:
        raise InvalidSpec("distillation needs the dense model as the teacher")
    _check_blocks(blocks)
    _check_vocab(model, blocks)
    dev = pick_device(str(device) if device is not None else None)
    n = int(blocks.shape[0])
    batch, per_epoch, total = plan_steps(n, spec, BatchRange(1, n))

    distiller: torch.nn.Module | None = None
    if spec.loss == "distillation" and teacher is not None:
        distiller = _teacher_module(model, teacher).to(dev).eval()
        distiller.requires_grad_(False)
    was_training = model.training
    model.to(dev)
    dtypes = _parameters_to_fp32(model)  # fp32 master weights whatever the checkpoint's dtype
    model.train()
    model.requires_grad_(True)
    masks = _keep_masks(model, masked)
    optimizer = _optimizer(spec, list(model.parameters()))
    progress = _Progress()
    history: list[dict[str, float]] = []
    resumed: int | None = None
    notify = on_step or (lambda step, total, summary: None)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(spec.seed)
            fingerprint = _fingerprint(spec, model, n)
            if checkpoint is not None and checkpoint.path.exists():
                resumed = _restore(
                    checkpoint.path, fingerprint, model, optimizer, progress, history
                )
            notify(progress.step, total, {"resumed_from_step": float(resumed)} if resumed else None)
            order_epoch, order = -1, torch.empty(0, dtype=torch.long)
            while progress.step < total:
                epoch = progress.step // per_epoch
                if epoch != order_epoch:
                    order_epoch, order = epoch, _epoch_order(n, spec.seed, epoch)
                position = progress.step % per_epoch
                ids = blocks[order[position * batch : (position + 1) * batch]].to(
                    dev, dtype=torch.long
                )  # (B, T)

                optimizer.zero_grad(set_to_none=True)
                with _autocast(dev):
                    logits = lm_logits(model, ids)  # (B, T, V)
                    soft = None
                    if distiller is not None:
                        with torch.no_grad():
                            soft = lm_logits(distiller, ids)
                loss = _lm_loss(spec, logits, ids, soft)
                loss.backward()  # type: ignore[no-untyped-call]
                with torch.no_grad():
                    for param, keep in masks.values():
                        if param.grad is not None:
                            param.grad.mul_(keep)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(spec, progress.step, total)
                optimizer.step()
                with torch.no_grad():
                    for param, keep in masks.values():
                        param.mul_(keep)  # weight decay and momentum must not revive them

                _accumulate(progress, loss, logits, ids, soft)
                _after_step(
                    progress,
                    spec,
                    per_epoch,
                    total,
                    history,
                    checkpoint,
                    lambda path: _save(path, fingerprint, model, optimizer, progress, history),
                    notify,
                )
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for param, dtype in dtypes:
                param.data = param.data.to(dtype)  # zeros stay zeros in any dtype
    return FineTuneResult(
        steps=total,
        epochs=math.ceil(total / per_epoch),
        history=tuple(history),
        resumed_from_step=resumed,
        device=str(dev),
    )
