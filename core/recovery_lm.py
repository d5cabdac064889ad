"""Recovery for language models (format ``hf``): token blocks for calibration, fine-tuning and
evaluation, perplexity before and after, and fine-tuning with pruned weights held at zero.

The same stages as :class:`core.recovery.Recovery` for ``pt2`` programs, on text: datasets are
tokenized at job time with the model's own tokenizer into blocks of ``seq_len`` tokens (see
:mod:`core.text`), scored by perplexity and trained with :func:`core.lm_recovery.fine_tune_lm`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.criteria import WEIGHT_GRANULARITIES
from core.device import pick_device
from core.errors import InvalidSpec
from core.finetune import Checkpointing, FineTuneResult
from core.formats.base import ModelInfo
from core.lm_recovery import evaluate_perplexity, fine_tune_lm
from core.progress import ProgressCallback
from core.recovery import PipelineData, RecoveryStages, StepCallback, TrainingConfig
from core.spec import FineTuneSpec, JobSpec
from core.text import (
    CALIBRATION_SAMPLES,
    CALIBRATION_SEQ_LEN,
    EVAL_SEQ_LEN,
    FINE_TUNE_SEQ_LEN,
    resolve_seq_len,
    token_blocks,
)


@dataclass(frozen=True)
class LmFeeds:
    """The job's datasets as token blocks, ``[N, seq_len]`` int64 each."""

    calibration: tuple[torch.Tensor, ...] | None
    fine_tune: torch.Tensor | None
    evaluation: torch.Tensor | None


def _blocks(
    model: Any, path: Path | None, what: str, seq_len: int, max_blocks: int | None
) -> torch.Tensor:
    if path is None:
        raise InvalidSpec(f"'{what}' needs a dataset, and none was given")
    config = model.model.config
    return token_blocks(
        path,
        model.tokenizer,
        seq_len,
        model.eos_token_id,
        max_blocks,
        vocab_size=config.vocab_size,
    )


def load_lm_feeds(spec: JobSpec, data: PipelineData, model: Any) -> LmFeeds:
    """Tokenize the datasets the spec names, each at its own ``seq_len`` (defaults 2048 for
    calibration, 512 for fine-tuning and evaluation, never above ``max_position_embeddings``;
    128 calibration blocks unless ``num_samples`` says otherwise),
    before any work: a dataset that cannot feed the model fails the job here."""
    LmRecovery.check(spec)
    positions = getattr(model.model.config, "max_position_embeddings", None)
    calibration = fine_tune = evaluation = None
    if spec.calibration is not None:
        seq_len = resolve_seq_len(spec.calibration.seq_len, CALIBRATION_SEQ_LEN, positions)
        samples = spec.calibration.samples(CALIBRATION_SAMPLES)
        ids = _blocks(model, data.calibration, "calibration", seq_len, samples)
        calibration = (ids,)
    if spec.fine_tune is not None:
        seq_len = resolve_seq_len(spec.fine_tune.seq_len, FINE_TUNE_SEQ_LEN, positions)
        fine_tune = _blocks(model, data.fine_tune, "fine_tune", seq_len, None)
    if spec.evaluation is not None:
        seq_len = resolve_seq_len(spec.evaluation.seq_len, EVAL_SEQ_LEN, positions)
        evaluation = _blocks(
            model, data.evaluation, "evaluation", seq_len, spec.evaluation.max_samples
        )
    return LmFeeds(calibration, fine_tune, evaluation)


@dataclass
class LmRecovery(RecoveryStages):
    """Evaluation and fine-tuning of one job's language model (``hf``)."""

    spec: JobSpec
    info: ModelInfo
    feeds: LmFeeds
    teacher: torch.nn.Module | None  # the dense model, for distillation
    train: TrainingConfig
    progress: ProgressCallback
    eval_before: dict[str, float] | None = None

    @staticmethod
    def check(spec: JobSpec) -> None:
        """Refuse what language models cannot be evaluated or trained with (before any work)."""
        if spec.fine_tune is not None and spec.fine_tune.loss not in ("causal_lm", "distillation"):
            raise InvalidSpec(
                f"fine_tune loss {spec.fine_tune.loss!r} does not train language models; use "
                "'causal_lm' or 'distillation'",
                "fine_tune",
            )
        if spec.evaluation is not None and spec.evaluation.task not in ("perplexity", "auto"):
            raise InvalidSpec(
                f"evaluation task {spec.evaluation.task!r} does not score language models; "
                "use 'perplexity'",
                "evaluation",
            )

    @classmethod
    def prepare(
        cls,
        spec: JobSpec,
        model: Any,
        info: ModelInfo,
        data: PipelineData,
        train: TrainingConfig,
        progress: ProgressCallback,
    ) -> LmRecovery:
        """Tokenize the datasets, keep the dense teacher, score the dense model."""
        distills = spec.fine_tune is not None and spec.fine_tune.loss == "distillation"
        # The dense module itself, not its weights: width and depth change the student's shapes,
        # so a state dict would no longer load into a copy of it.
        teacher = copy.deepcopy(model.model).requires_grad_(False) if distills else None
        recovery = cls(spec, info, load_lm_feeds(spec, data, model), teacher, train, progress)
        recovery.eval_before = recovery.evaluate(model, "evaluate_before", "before pruning")
        return recovery

    @property
    def calibration(self) -> tuple[torch.Tensor, ...] | None:
        return self.feeds.calibration

    @property
    def masked(self) -> list[str]:
        # Width and depth remove units physically (a removed layer's weights are gone): only
        # weights zeroed in place have zeros to hold.
        if self.spec.pruning.granularity in WEIGHT_GRANULARITIES:
            return super().masked
        return []

    def _score(self, model: Any) -> dict[str, float] | None:
        if self.spec.evaluation is None or self.feeds.evaluation is None:
            return None
        return evaluate_perplexity(
            model.model,
            self.feeds.evaluation,
            batch_size=min(self.spec.evaluation.batch_size, 8),
            device=pick_device(self.train.device),
        )

    def _total_steps(self, tune: FineTuneSpec) -> int:
        assert self.feeds.fine_tune is not None
        per_epoch = -(-len(self.feeds.fine_tune) // tune.batch_size)
        return tune.steps or (tune.epochs or 1) * per_epoch

    def _train(
        self, model: Any, tune: FineTuneSpec, checkpoint: Path | None, on_step: StepCallback
    ) -> FineTuneResult | None:
        if self.feeds.fine_tune is None:
            return None
        return fine_tune_lm(
            model.model,
            self.feeds.fine_tune,
            tune,
            masked=self.masked,
            teacher=self.teacher,
            device=self.train.device,
            checkpoint=Checkpointing(checkpoint, self.train.checkpoint_every_steps)
            if checkpoint
            else None,
            on_step=on_step,
        )
