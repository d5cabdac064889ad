"""One exception hierarchy for the pruning library.

Nothing here knows about HTTP or queues: the service maps ``code`` to a problem type (API) or to
``error.type`` on a failed job (worker). Messages are sentences a person can act on.
"""

from __future__ import annotations

from typing import ClassVar


class ShearsError(Exception):
    """Base of every error ``core`` raises on purpose."""

    code: ClassVar[str] = "shears_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedFormat(ShearsError):
    """Not a format Shears accepts: a pickle, TorchScript, anything but ``torch.export``."""

    code = "unsupported_format"


class InvalidArchive(ShearsError):
    """The file claims an accepted format but is malformed, truncated or inconsistent."""

    code = "invalid_archive"


class UnsafeArchive(InvalidArchive):
    """The archive holds something that could run code or escape its folder when loaded."""

    code = "unsafe_archive"


class InvalidSpec(ShearsError):
    """A well-formed pruning spec that cannot apply to this model (unknown layer, bad ratio).

    ``field`` names the spec's section at fault where one does (``"evaluation"``, or a dotted
    path such as ``"pruning.search.grid"``), so a caller can point at it."""

    code = "invalid_spec"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelLoadError(ShearsError):
    """A gated archive could still not be turned into a runnable program."""

    code = "model_load_failed"


class PruningError(ShearsError):
    """Pruning or re-exporting the program failed."""

    code = "pruning_failed"


class DeviceUnavailable(ShearsError):
    """The device a step should run on does not exist in this process (no CUDA, a bad index)."""

    code = "device_unavailable"


class TimeLimitExceeded(ShearsError):
    """The job ran past its time limit and was stopped."""

    code = "time_limit_exceeded"


class Cancelled(ShearsError):
    """The caller asked the pipeline to stop (checked between steps)."""

    code = "cancelled"


class InvalidDataset(ShearsError):
    """A dataset file of an accepted format (.npz, .safetensors) that is malformed or unusable:
    object arrays, non-numeric dtypes, NaN or infinite values, mismatched sample counts."""

    code = "invalid_dataset"


class DatasetMismatch(ShearsError):
    """A valid dataset that cannot feed this model: wrong number of inputs, shapes or dtypes, or
    targets that do not fit the model's outputs or the loss."""

    code = "dataset_mismatch"
