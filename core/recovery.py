"""Winning accuracy back after pruning: the job's datasets, evaluation and fine-tuning.

Prepared before pruning (datasets read and checked against the model, the dense teacher
snapshotted, the dense model scored), used after it (score, retrain with pruned weights held at
zero, score again) and between the rounds of an iterative schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.batchnorm import reestimate_batchnorm
from core.data import BatchRange, Dataset, batch_range, load_dataset, match_program
from core.device import pick_device
from core.errors import InvalidSpec
from core.evaluate import evaluate
from core.finetune import (
    Checkpointing,
    FineTuneResult,
    fine_tune,
    plan_steps,
    snapshot_state,
)
from core.formats.base import ModelInfo
from core.formats.pt2.program import module_on
from core.progress import FRACTION, ProgressCallback, between
from core.pruning.rounds import RoundHook
from core.schedule import round_steps, rounds_of, shares_budget
from core.spec import FineTuneSpec, JobSpec

StepCallback = Callable[[int, int, dict[str, float] | None], None]

Program = torch.export.ExportedProgram


@dataclass(frozen=True)
class PipelineData:
    """Dataset files (``.npz``/``.safetensors``, see :mod:`core.data`) for the spec's
    ``fine_tune``, ``evaluation`` and ``calibration``; each is required when its spec is given."""

    fine_tune: Path | None = None
    evaluation: Path | None = None
    calibration: Path | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """Where fine-tuning and evaluation run (default: CUDA when available, else CPU), and where
    fine-tuning checkpoints (``None``: it does not; an existing checkpoint is resumed)."""

    device: str | None = None
    checkpoint: Path | None = None
    checkpoint_every_steps: int = 50


# Programs calibrate on this many samples unless the job says otherwise.
CALIBRATION_SAMPLES = 256


@dataclass(frozen=True)
class Feeds:
    """The job's datasets, read and matched to the program's inputs."""

    fine_tune: Dataset | None
    evaluation: Dataset | None
    limits: BatchRange
    # The first ``calibration.num_samples`` inputs, one tensor per program input, for the
    # data-aware criteria of the pruning step.
    calibration: tuple[torch.Tensor, ...] | None = None


def load_feeds(spec: JobSpec, data: PipelineData, info: ModelInfo) -> Feeds:
    """Read the datasets the spec asks for and check them against the model before any work:
    a dataset that cannot feed the program fails the job here, not hours into training."""
    Recovery.check(spec)
    read: dict[Path, Dataset] = {}

    def feed(what: str, path: Path | None, needs_targets: bool) -> Dataset:
        if path is None:
            raise InvalidSpec(f"'{what}' needs a dataset, and none was given")
        if path not in read:
            read[path] = match_program(load_dataset(path), info.inputs)
        dataset = read[path]
        if needs_targets and dataset.targets is None:
            raise InvalidSpec(f"'{what}' needs a dataset with targets; this one has none")
        return dataset

    calibration = None
    if spec.calibration is not None:
        samples = feed("calibration", data.calibration, False)
        first = spec.calibration.samples(CALIBRATION_SAMPLES)
        calibration = tuple(t[:first] for t in samples.inputs)
    return Feeds(
        fine_tune=feed("fine_tune", data.fine_tune, spec.fine_tune.needs_targets)
        if spec.fine_tune
        else None,
        evaluation=feed("evaluation", data.evaluation, True) if spec.evaluation else None,
        limits=batch_range(info.inputs),
        calibration=calibration,
    )


@dataclass(frozen=True)
class Recovered:
    """Scores after pruning and after fine-tuning, and what the fine-tuning did."""

    eval_after_pruning: dict[str, float] | None = None
    eval_after_fine_tune: dict[str, float] | None = None
    tuned: FineTuneResult | None = None

    def fine_tune_report(self) -> dict[str, Any] | None:
        if self.tuned is None:
            return None
        return {
            "steps": self.tuned.steps,
            "epochs": self.tuned.epochs,
            "device": self.tuned.device,
            "resumed_from_step": self.tuned.resumed_from_step,
            "history": list(self.tuned.history),
        }


class RecoveryStages:
    """The stages every format shares around the pruning step: score, fine-tune with the pruned
    weights held, score again; the same between the rounds of an iterative schedule.

    A format's recovery says how its model is scored (:meth:`_score`), trained (:meth:`_train`)
    and how many optimizer steps its fine-tune takes (:meth:`_total_steps`).
    """

    spec: JobSpec
    info: ModelInfo
    train: TrainingConfig
    progress: ProgressCallback
    eval_before: dict[str, float] | None

    @property
    def masked(self) -> list[str]:
        """The weights whose zeros stay zero while training: every prunable layer's."""
        return [f"{layer.name}.weight" for layer in self.info.prunable_layers]

    def _score(self, model: Any) -> dict[str, float] | None:
        """The model's scores on the evaluation data; None without evaluation."""
        raise NotImplementedError

    def _train(
        self, model: Any, tune: FineTuneSpec, checkpoint: Path | None, on_step: StepCallback
    ) -> FineTuneResult | None:
        """Train ``model`` in place as ``tune`` says; None without fine-tuning data."""
        raise NotImplementedError

    def _total_steps(self, tune: FineTuneSpec) -> int:
        raise NotImplementedError

    def _refresh_statistics(self, model: Any, tune: FineTuneSpec) -> int:
        """Re-measure the normalisation statistics that pruning left stale (BatchNorm's running
        mean and variance) on the fine-tuning data; returns how many layers changed. Formats
        without such statistics keep this no-op."""
        return 0

    def refresh_statistics(self, model: Any) -> None:
        """The last part of pruning: statistics measured again, reported as a pruning event."""
        tune = self.spec.fine_tune
        if tune is None or tune.batchnorm_samples == 0:
            return
        changed = self._refresh_statistics(model, tune)
        if changed:
            self.progress(
                "pruning",
                FRACTION["prune"],
                f"re-estimated the statistics of {changed} BatchNorm layers",
                {"batchnorm_layers": float(changed)},
            )

    def evaluate(self, model: Any, step: str, when: str) -> dict[str, float] | None:
        """Score ``model``, with an event before and one with the scores (``when`` says which)."""
        if self.spec.evaluation is None:
            return None
        fraction = FRACTION[step]
        self.progress("evaluating", fraction, f"evaluating {when}")
        metrics = self._score(model)
        if metrics is not None:
            self.progress("evaluating", fraction, f"evaluated {when}", {"when": when, **metrics})
        return metrics

    def recover(self, model: Any) -> Recovered:
        """Re-estimate stale statistics, evaluate the pruned model, fine-tune it in place,
        evaluate again."""
        self.refresh_statistics(model)
        after_pruning = self.evaluate(model, "evaluate_after_pruning", "after pruning")
        rounds = rounds_of(self.spec.pruning)
        tune = self._round_tune(rounds, rounds)
        tuned = (
            self._train(model, tune, self.train.checkpoint, self._on_step)
            if tune is not None
            else None
        )
        after_tuning = (
            self.evaluate(model, "evaluate_after_fine_tune", "after fine-tuning")
            if tuned is not None
            else None
        )
        return Recovered(after_pruning, after_tuning, tuned)

    def _on_step(self, step: int, total: int, summary: dict[str, float] | None) -> None:
        # Every optimizer step reports progress: that is where a cancel stops training (the
        # worker's callback raises), and it is throttled there. Each epoch's summary becomes an
        # event.
        if summary and "epoch" in summary:
            message = f"epoch {int(summary['epoch'])}: loss {summary['loss']:.4f}"
        elif summary:
            message = f"resumed from the checkpoint at step {step}/{total}"
        else:
            message = f"step {step}/{total}"
        fraction = between("fine_tune", "fine_tune_end", step / max(total, 1))
        self.progress("fine_tuning", fraction, message, summary)

    def _round_tune(self, round_: int, rounds: int) -> FineTuneSpec | None:
        """The fine-tune after round ``round_`` of ``rounds`` (the last: the final fine-tune),
        its steps from :func:`core.schedule.round_steps`. A shared budget moves the seed on
        each round, so that every round trains on other batches."""
        tune = self.spec.fine_tune
        shared = shares_budget(self.spec.pruning)
        if tune is None or rounds == 1 or (round_ == rounds and not shared):
            return tune
        each, last = round_steps(rounds, self._total_steps(tune), shared=shared)
        update: dict[str, Any] = {"steps": last if round_ == rounds else each, "epochs": None}
        if shared:
            update["seed"] = tune.seed + round_ - 1
        return tune.model_copy(update=update)

    def round_hook(self, rounds: int) -> RoundHook:
        """The hook between the rounds of an iterative schedule: evaluate (an event per round
        with ``{"round", "rounds", ...metrics}``) and fine-tune for the round's share of the
        spec's steps (:func:`core.schedule.round_steps`)."""

        def hook(t: int, n: int, model: Any) -> None:
            share = self._round_tune(t, n)
            self.refresh_statistics(model)
            metrics = self.evaluate(model, "prune", f"after round {t} of {n}")
            if metrics is not None:
                self.progress(
                    "pruning",
                    FRACTION["prune"],
                    f"round {t} of {n} evaluated",
                    {"round": t, "rounds": n, **metrics},
                )
            if share is not None:
                checkpoint = self.train.checkpoint
                self._train(
                    model,
                    share,
                    checkpoint.with_name(f"{checkpoint.stem}.round{t}.pt") if checkpoint else None,
                    lambda step, total, data: self.progress(
                        "fine_tuning", FRACTION["prune"], f"round {t}: step {step}/{total}", data
                    ),
                )

        return hook


@dataclass
class Recovery(RecoveryStages):
    """Evaluation and fine-tuning of one job's program (``pt2``)."""

    spec: JobSpec
    info: ModelInfo
    feeds: Feeds
    teacher: dict[str, torch.Tensor] | None  # the dense model, for distillation
    train: TrainingConfig
    progress: ProgressCallback
    eval_before: dict[str, float] | None = None

    @staticmethod
    def check(spec: JobSpec) -> None:
        """Refuse what programs cannot be evaluated or trained with (before any work)."""
        if spec.evaluation is not None and spec.evaluation.task == "perplexity":
            raise InvalidSpec(
                "evaluation task 'perplexity' scores language models (format 'hf')", "evaluation"
            )
        if spec.fine_tune is not None and spec.fine_tune.loss == "causal_lm":
            raise InvalidSpec(
                "fine_tune loss 'causal_lm' trains language models (format 'hf')", "fine_tune"
            )

    @classmethod
    def prepare(
        cls,
        spec: JobSpec,
        program: Program,
        info: ModelInfo,
        data: PipelineData,
        train: TrainingConfig,
        progress: ProgressCallback,
    ) -> Recovery:
        """Read the datasets, keep the dense teacher, score the dense program."""
        distills = spec.fine_tune is not None and spec.fine_tune.loss == "distillation"
        teacher = snapshot_state(program) if distills else None
        recovery = cls(spec, info, load_feeds(spec, data, info), teacher, train, progress)
        recovery.eval_before = recovery.evaluate(program, "evaluate_before", "before pruning")
        return recovery

    @property
    def calibration(self) -> tuple[torch.Tensor, ...] | None:
        """Inputs for the data-aware criteria of the pruning step."""
        return self.feeds.calibration

    def _score(self, program: Program) -> dict[str, float] | None:
        if self.spec.evaluation is None or self.feeds.evaluation is None:
            return None
        device = pick_device(self.train.device)
        module = module_on(program, device)  # eval mode: the graph as it was exported
        return evaluate(
            module, self.feeds.evaluation, self.spec.evaluation, self.feeds.limits, device
        )

    def _refresh_statistics(self, program: Program, tune: FineTuneSpec) -> int:
        data, limits = self.feeds.fine_tune, self.feeds.limits
        batch = limits.clamp(tune.batch_size)
        take = min(tune.batchnorm_samples, data.num_samples) if data is not None else 0
        if limits.min == limits.max:  # a fixed batch: whole batches only
            take -= take % batch
        if data is None or batch < 2 or take < max(2, limits.min):
            return 0
        # A seeded sample, not the first rows: a dataset sorted by class would skew them.
        generator = torch.Generator().manual_seed(tune.seed)
        rows = torch.randperm(data.num_samples, generator=generator)[:take]
        return reestimate_batchnorm(
            program,
            [t[rows] for t in data.inputs],
            batch_size=batch,
            device=pick_device(self.train.device),
        )

    def _total_steps(self, tune: FineTuneSpec) -> int:
        assert self.feeds.fine_tune is not None
        return plan_steps(self.feeds.fine_tune.num_samples, tune, self.feeds.limits)[2]

    def _train(
        self, program: Program, tune: FineTuneSpec, checkpoint: Path | None, on_step: StepCallback
    ) -> FineTuneResult | None:
        if self.feeds.fine_tune is None:
            return None
        return fine_tune(
            program,
            self.feeds.fine_tune,
            tune,
            limits=self.feeds.limits,
            masked=self.masked,
            teacher_state=self.teacher,
            device=self.train.device,
            checkpoint=Checkpointing(checkpoint, self.train.checkpoint_every_steps)
            if checkpoint
            else None,
            on_step=on_step,
        )
