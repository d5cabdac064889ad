"""The pruning spec: what to remove, how to rank it and how much.

A spec is stored with every job and may be replayed long after it was written, so it is frozen,
strict (unknown fields are errors, not silently ignored) and versioned: ``SPEC_VERSION`` changes
whenever a stored spec would mean something else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

from core.criteria import CRITERIA, fits_granularity, needs_data

SPEC_VERSION = 1


def _known_criterion(name: str) -> str:
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; one of: {', '.join(CRITERIA)}")
    return name


# The names come from the criteria table (core.criteria), the one place a criterion is declared.
Criterion = Annotated[
    str,
    AfterValidator(_known_criterion),
    WithJsonSchema({"type": "string", "enum": list(CRITERIA)}),
]
Granularity = Literal["unstructured", "channel", "head", "n:m", "block", "width", "depth"]
Scope = Literal["layer", "global"]

Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]
GridRatio = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OneShotSchedule(_Frozen):
    """Prune everything at once."""

    kind: Literal["one_shot"] = "one_shot"


class IterativeSchedule(_Frozen):
    """Prune in ``rounds`` steps towards the final sparsity, on the cubic schedule of Zhu & Gupta
    (AGP): after round t of n the sparsity is ``s * (1 - (1 - t/n)^3)``. With fine-tuning, the
    rounds interleave with it."""

    kind: Literal["iterative"]
    rounds: int = Field(default=5, ge=1, le=100, description="Number of pruning steps.")
    fine_tune_budget: Literal["added", "shared"] = Field(
        default="added",
        description=(
            "`added`: each round but the last is followed by 1/rounds of the fine-tune's steps, "
            "and the whole fine-tune runs after the last round. `shared`: the rounds spend the "
            "fine-tune's own steps, half of them spread evenly between the rounds while the "
            "sparsity climbs, the other half after the last round (gradual pruning within the "
            "user's budget)."
        ),
    )


Schedule = Annotated[OneShotSchedule | IterativeSchedule, Field(discriminator="kind")]


class WidthSpec(_Frozen):
    """Language models: fractions removed in every decoder layer alike, so the result stays a
    stock config. A fraction f removes round(f x count) units."""

    mlp: Ratio = Field(default=0.0, description="MLP neurons (intermediate_size).")
    heads: Ratio = Field(
        default=0.0,
        description="Attention heads; under GQA whole key/value groups with their query heads.",
    )
    hidden: Ratio = Field(
        default=0.0, description="Hidden channels: embeddings, every norm and projection."
    )


class DepthSpec(_Frozen):
    """Language models: remove the decoder layers whose removal changes the hidden states least."""

    layers: int = Field(ge=1, le=1000, description="Decoder layers removed.")


class TargetSpec(_Frozen):
    """What the job aims for when it finds the per-layer ratios itself: exactly one key.

    Example:
        >>> TargetSpec(macs=0.5)   # keep at most half of the dense model's MACs
        TargetSpec(macs=0.5, ...)
    """

    macs: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Keep at most this fraction of the MACs."
    )
    params: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Keep at most this fraction of the parameters."
    )
    latency: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="At most this fraction of the dense latency, on the worker's device.",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Classification: lose at most this much accuracy (absolute), judged on the "
        "evaluation data after any fine-tuning; as much is removed as fits.",
    )
    max_perplexity_increase: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="Language models: at most this relative perplexity increase.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSpec:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one target of: {', '.join(type(self).model_fields)}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        """The one key given (``macs``, ``params``, ...)."""
        return next(n for n in type(self).model_fields if getattr(self, n) is not None)

    @property
    def value(self) -> float:
        value = getattr(self, self.kind)
        assert isinstance(value, float)
        return value


DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))


class SearchSpec(_Frozen):
    """The sensitivity scan: each layer (channel group) pruned alone at each ratio of ``grid``
    and scored on the first ``num_samples`` of the search data."""

    grid: tuple[GridRatio, ...] = Field(
        default=DEFAULT_GRID,
        min_length=1,
        max_length=50,
        description="Ratios each layer is scanned at; default 0.1, 0.2, ..., 0.9. Not with "
        "`n:m`, where each layer is dense or n:m: the scan tries 1 - n/m only.",
    )
    num_samples: int = Field(default=512, ge=1, le=1_000_000, description="Samples scored.")

    @model_validator(mode="after")
    def _sorted(self) -> SearchSpec:
        if list(self.grid) != sorted(set(self.grid)):
            raise ValueError("grid: ratios must be increasing, each once")
        return self


def _sparsity_optional(schema: dict[str, Any]) -> None:
    # The "before" validator fills `sparsity` in for n:m, so clients may leave it out there; the
    # published schema must not call it required (a stricter check follows in validation).
    schema["required"] = [name for name in schema.get("required", []) if name != "sparsity"]


class PruningSpec(_Frozen):
    """Importance criterion x granularity x ratio.

    Example:
        >>> PruningSpec(criterion="l1", granularity="unstructured", sparsity=0.8, scope="global")
        PruningSpec(criterion='l1', ...)
    """

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_sparsity_optional)

    criterion: Criterion = Field(
        description="How weights, channels or heads are ranked; the lowest go first. `l1`, `l2`, "
        "`lp` (with `p`): magnitude; `random` (with `seed`); `lamp`: layer-adaptive magnitude "
        "(unstructured); `bn_scale`: |gamma| of the norm after each channel; `apoz`, "
        "`regression`, `taylor`: data-aware, need `calibration` (channel/head)."
    )
    p: float | None = Field(default=None, gt=0, description="The norm's p; required with `lp`.")
    seed: int = Field(default=0, description="Seed of the `random` criterion.")
    granularity: Granularity = Field(
        description="What is removed: single weights (`unstructured`), n of every m weights "
        "(`n:m`), whole blocks (`block`), or, physically so the program gets smaller, whole "
        "output channels of convolutions/linear layers with everything coupled to them "
        "(`channel`) or whole attention heads (`head`)."
    )
    sparsity: Ratio = Field(
        description="Fraction removed in each ranking pool: of weights (unstructured, block), "
        "of channels (channel) or of heads (head). Optional with `n:m`, where it is 1 - n/m."
    )
    n_m: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=2, le=64)]] | None = Field(
        default=None,
        description="With `n:m`: keep n of every m consecutive weights along the reduction "
        "dimension (input channels); default [2, 4].",
    )
    block: tuple[Annotated[int, Field(ge=1, le=64)], Annotated[int, Field(ge=1, le=64)]] | None = (
        Field(
            default=None,
            description="With `block`: the block shape (rows x columns of the weight seen as "
            "out x in*kernel); whole blocks are removed. Default [1, 4].",
        )
    )
    scope: Scope = Field(
        default="layer",
        description="`layer`: every layer at `sparsity`; `global`: one ranking across layers.",
    )
    max_layer_sparsity: float = Field(
        default=0.99,
        gt=0.0,
        le=1.0,
        description="With `global`, no layer loses more than this fraction of its weights.",
    )
    layer_sparsity: dict[str, Ratio] = Field(
        default_factory=dict,
        description="Per-layer overrides: glob over layer names -> sparsity; first match wins.",
    )
    exclude: tuple[str, ...] = Field(
        default=(), description="Globs over layer names that are never pruned."
    )
    schedule: Schedule = Field(
        default_factory=OneShotSchedule,
        description='`{"kind": "one_shot"}` or `{"kind": "iterative", "rounds": 5}` (cubic AGP).',
    )
    width: WidthSpec | None = Field(
        default=None,
        description='With `width` (language models): `{"mlp", "heads", "hidden"}`; beside a '
        "`target`, the kinds given are fixed and the search finds the others.",
    )
    depth: DepthSpec | None = Field(
        default=None, description='With `depth` (language models): `{"layers": k}`.'
    )
    target: TargetSpec | None = Field(
        default=None,
        description="Instead of `sparsity`: what to reach (`macs`, `params`, `latency`, "
        "`max_accuracy_drop`, `max_perplexity_increase`); the job finds per-layer ratios.",
    )
    search: SearchSpec | None = Field(
        default=None, description="With `target`: the sensitivity scan's grid and sample count."
    )

    @model_serializer(mode="wrap")
    def _without_placeholder(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # With a target, `sparsity` is only the validator's placeholder: a stored spec that kept
        # it would be refused when read back ("target or sparsity, not both").
        data: dict[str, Any] = handler(self)
        if self.target is not None:
            data.pop("sparsity", None)
            # Beside a target, the width kinds given are the ones the user fixed (the search
            # finds the others): keep only those, so a stored spec reads back the same.
            if self.width is not None and isinstance(data.get("width"), dict):
                data["width"] = {
                    k: v for k, v in data["width"].items() if k in self.width.model_fields_set
                }
        return data

    @model_validator(mode="before")
    @classmethod
    def _target_replaces_sparsity(cls, data: Any) -> Any:
        # A target decides the ratios: `sparsity` beside it would be ignored, so it is refused.
        if isinstance(data, dict) and data.get("target") is not None:
            if "sparsity" in data:
                raise ValueError("give 'target' or 'sparsity', not both: a target finds the ratios")
            data = {**data, "sparsity": 0.0}
        return data

    @model_validator(mode="before")
    @classmethod
    def _granularity_defaults(cls, data: Any) -> Any:
        # n:m fixes the ratio, so `sparsity` may be left out; fill it in so it is always set.
        # Beside a target only the pattern is filled in: a `sparsity` would read as the user's,
        # and the target's own check (core.search.targets) says which granularities it reaches.
        if isinstance(data, dict) and data.get("target") is not None:
            if data.get("granularity") == "n:m":
                data = {**data, "n_m": data.get("n_m") or (2, 4)}
            if data.get("granularity") == "block":
                data = {**data, "block": data.get("block") or (1, 4)}
            return data
        if isinstance(data, dict) and data.get("granularity") == "n:m":
            data = dict(data)
            n_m = data.setdefault("n_m", (2, 4))
            if (
                isinstance(n_m, (list, tuple))
                and len(n_m) == 2
                and all(isinstance(v, int) and v > 0 for v in n_m)
            ):
                data.setdefault("sparsity", 1 - n_m[0] / n_m[1])
        if isinstance(data, dict) and data.get("granularity") in ("width", "depth"):
            # The amounts are in `width`/`depth`; `sparsity` has no meaning there.
            data = {**data, "sparsity": data.get("sparsity", 0.0)}
        if isinstance(data, dict) and data.get("granularity") == "block":
            data = {**data, "block": data.get("block") or (1, 4)}
        return data

    @model_validator(mode="after")
    def _criterion_arguments(self) -> PruningSpec:
        if self.criterion == "lp" and self.p is None:
            raise ValueError("criterion 'lp' needs 'p', the norm's exponent (e.g. 1 or 2)")
        if self.criterion != "lp" and self.p is not None:
            raise ValueError("'p' only applies to criterion 'lp'")
        misfit = fits_granularity(self.criterion, self.granularity)
        if misfit is not None:
            raise ValueError(misfit)
        if self.n_m is not None:
            n, m = self.n_m
            if self.granularity != "n:m":
                raise ValueError("'n_m' only applies to granularity 'n:m'")
            if n >= m:
                raise ValueError(f"n_m {list(self.n_m)}: n must be smaller than m (keep n of m)")
            # With a target, `sparsity` is a placeholder: the search makes each layer dense or n:m.
            if self.target is None and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"with n_m {list(self.n_m)} the sparsity is {1 - n / m}; leave 'sparsity' out"
                )
        if self.granularity == "n:m" and self.schedule.kind != "one_shot":
            raise ValueError("n:m is a fixed pattern, applied in one shot; use kind 'one_shot'")
        for name in ("width", "depth"):
            given = getattr(self, name) is not None
            if given and self.granularity != name:
                raise ValueError(f"{name!r} only applies to granularity {name!r}")
            # A target finds the amounts itself (those given are fixed, not searched).
            if not given and self.granularity == name and self.target is None:
                raise ValueError(
                    f"granularity {name!r} takes its amounts in {name!r} (or give a 'target')"
                )
        if self.block is not None and self.granularity != "block":
            raise ValueError("'block' only applies to granularity 'block'")
        if self.search is not None and self.target is None:
            raise ValueError("'search' only applies with a 'target'")
        if self.target is not None and self.scope != "layer":
            raise ValueError("a 'target' chooses a ratio per layer; leave 'scope' out")
        if self.target is not None and self.schedule.kind != "one_shot":
            raise ValueError("a 'target' is reached in one shot; use kind 'one_shot'")
        return self


SeqLen = Annotated[int, Field(ge=8, le=1_048_576)]


class CalibrationSpec(_Frozen):
    """How much of the calibration dataset data-aware criteria may look at."""

    num_samples: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Samples taken from the calibration dataset (blocks of `seq_len` tokens for "
        "language models); default 256 for programs, 128 for language models.",
    )
    seq_len: SeqLen | None = Field(
        default=None,
        description="Language models: tokens per calibration block; default 2048, never above "
        "the model's `max_position_embeddings`.",
    )

    def samples(self, default: int) -> int:
        """``num_samples``, or the model format's ``default`` where the job left it out (the
        default differs by format, so it is resolved where the format is known)."""
        return self.num_samples if self.num_samples is not None else default


Optimizer = Literal["sgd", "adamw"]
Loss = Literal["cross_entropy", "mse", "distillation", "causal_lm"]


class FineTuneSpec(_Frozen):
    """Retraining after pruning, with the pruned weights held at zero.

    Give ``epochs`` or ``steps`` (one optimizer step = one batch). The learning rate warms up
    linearly over ``warmup_steps``, then follows ``schedule``. ``distillation`` trains towards
    the dense model's outputs (KL divergence at ``temperature``) and needs no targets; with
    ``alpha < 1`` it adds ``(1 - alpha)`` x cross-entropy on the targets.

    Example:
        >>> FineTuneSpec(epochs=3, batch_size=64, lr=1e-3, optimizer="adamw", loss="cross_entropy")
        FineTuneSpec(epochs=3, ...)
    """

    epochs: int | None = Field(default=None, ge=1, le=10_000, description="Passes over the data.")
    steps: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Optimizer steps, instead of epochs."
    )
    batch_size: int = Field(default=64, ge=1, le=65_536)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0, description="Peak learning rate.")
    optimizer: Optimizer = "adamw"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    # Defaults measured in issue 12 (docs/benchmarks.md, "Fine-tuning defaults vs a plain
    # loop"): AdamW's own weight decay and a constant lr lost nothing to a user's plain loop,
    # where no decay and a cosine schedule did.
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    schedule: Literal["cosine", "constant"] = Field(
        default="constant", description="After warm-up: constant, or cosine decay to zero."
    )
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000)
    batchnorm_samples: int = Field(
        default=256,
        ge=0,
        le=1_000_000,
        description="Right after pruning, every BatchNorm's running statistics are measured "
        "again on this many training samples (forward passes, no gradients), before the "
        "after-pruning evaluation and the fine-tuning; 0 keeps the dense model's.",
    )
    seed: int = Field(default=0, description="Seeds the data order and any dropout.")
    loss: Loss = "cross_entropy"
    temperature: float = Field(default=4.0, gt=0.0, le=100.0, description="Distillation only.")
    seq_len: SeqLen | None = Field(
        default=None,
        description="Language models: tokens per training block; default 512, never above the "
        "model's `max_position_embeddings`.",
    )
    alpha: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Distillation only: weight of the KL term; 1 - alpha weighs cross-entropy.",
    )

    @model_validator(mode="after")
    def _length(self) -> FineTuneSpec:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of 'epochs' and 'steps'")
        return self

    @property
    def needs_targets(self) -> bool:
        """Whether the loss reads the dataset's targets (language models read the next token
        of their own text)."""
        if self.loss == "causal_lm":
            return False
        return self.loss != "distillation" or self.alpha < 1.0


class EvaluationSpec(_Frozen):
    """How the model is scored before pruning, after pruning and after fine-tuning.

    ``classification`` reports ``accuracy`` (top-1), ``top_k_accuracy`` for ``top_k`` and the
    cross-entropy ``loss``; ``regression`` reports ``mse`` (= ``loss``). ``auto`` picks
    classification when the targets are integers; both need targets. ``perplexity`` (language
    models) scores next-token prediction on text.
    """

    task: Literal["auto", "classification", "regression", "perplexity"] = "auto"
    top_k: int = Field(default=5, ge=2, le=1000, description="k of the top-k accuracy.")
    batch_size: int = Field(default=256, ge=1, le=65_536)
    max_samples: int | None = Field(
        default=None, ge=1, description="Score only the first this many samples (blocks)."
    )
    seq_len: SeqLen | None = Field(
        default=None,
        description="`perplexity`: tokens per scored block; default 512, never above the "
        "model's `max_position_embeddings`.",
    )

    @property
    def needs_targets(self) -> bool:
        return self.task != "perplexity"


class JobSpec(_Frozen):
    """Everything the pipeline needs to know about one job, besides the model itself.

    Datasets are not named here: the caller hands their files to :func:`core.pipeline.run`.
    """

    pruning: PruningSpec
    dry_run: bool = Field(
        default=False, description="Report what would be pruned; prune and export nothing."
    )
    calibration: CalibrationSpec | None = Field(
        default=None, description="Calibration data for apoz, regression and taylor."
    )
    fine_tune: FineTuneSpec | None = None
    evaluation: EvaluationSpec | None = None
    sensitivity_only: bool = Field(
        default=False,
        description="With `pruning.target`: stop after the sensitivity scan (artifact "
        "`sensitivity`), prune nothing.",
    )

    @model_validator(mode="after")
    def _sensitivity_needs_target(self) -> JobSpec:
        if self.sensitivity_only and self.pruning.target is None:
            raise ValueError("'sensitivity_only' needs 'pruning.target' (a scan to stop after)")
        return self

    @model_validator(mode="after")
    def _calibration_for_data_aware(self) -> JobSpec:
        if needs_data(self.pruning.criterion) and self.calibration is None:
            raise ValueError(
                f"criterion {self.pruning.criterion!r} ranks channels on data; add "
                '"calibration": {"dataset_id": "...", "num_samples": 256}'
            )
        return self
