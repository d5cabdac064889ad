"""The service's refusals. No HTTP here: ``api.errors`` maps each class to problem+json once.

Besides these, services let ``core.errors.ShearsError`` (e.g. ``InvalidArchive``) and
``shears.db.repository.InvalidCursor`` through; ``api.errors`` maps those too.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every refusal a service raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    """No ``what`` with this id exists for the caller's tenant."""

    def __init__(self, what: str, id_: str) -> None:
        super().__init__(f"No {what} with id {id_!r} exists.")
        self.what = what
        self.id = id_


class InvalidField(ServiceError):
    """A well-formed request whose value at ``field`` (a path into the body) cannot work."""

    def __init__(self, field: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.field = field


class Conflict(ServiceError):
    """The resource's state forbids the action; ``reason`` is a stable slug, e.g. ``job-active``."""

    def __init__(self, reason: str, title: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.title = title


class QueueFull(ServiceError):
    """The tenant has as many queued jobs as it may; retry after ``retry_after`` seconds."""

    def __init__(self, limit: int, retry_after: int = 30) -> None:
        super().__init__(
            f"This tenant already has {limit} queued jobs; retry when some have started."
        )
        self.limit = limit
        self.retry_after = retry_after


class IdempotencyMismatch(ServiceError):
    """An ``Idempotency-Key`` used before with a different request body."""

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a new job."
        )


class Gone(ServiceError):
    """The row exists but its file does not any more (``what``: e.g. ``artifact``)."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what
