"""The real service as separate processes: see ``examples.processes`` (shared with bench/)."""

from __future__ import annotations

from examples.processes import ROOT, Service, service_env

__all__ = ["ROOT", "Service", "service_env"]
