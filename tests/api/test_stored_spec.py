"""``jobs.spec`` has one shape, the request's: core's spec with a ``dataset_id`` in each section
that reads a dataset. Stored specs are replayed long after they were written, so rows written
before this shape was named (by ``stored_spec`` of the reflection-based module) must still parse."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from core.spec import CalibrationSpec, EvaluationSpec, FineTuneSpec, JobSpec, PruningSpec
from shears.db.tables import Job
from shears.jobspec import JobSpecRequest, parse_stored
from tests.api.conftest import Api, upload

# Written by the previous code for a taylor job with all three datasets (copied from a row).
TODAYS_ROW = {
    "pruning": {
        "criterion": "taylor",
        "p": None,
        "seed": 0,
        "granularity": "channel",
        "sparsity": 0.5,
        "n_m": None,
        "block": None,
        "scope": "layer",
        "max_layer_sparsity": 0.99,
        "layer_sparsity": {},
        "exclude": [],
        "schedule": {"kind": "one_shot"},
    },
    "dry_run": False,
    "calibration": {"dataset_id": "dst_c", "num_samples": 64},
    "fine_tune": {
        "dataset_id": "dst_f",
        "epochs": 2,
        "steps": None,
        "batch_size": 64,
        "lr": 0.001,
        "optimizer": "adamw",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "warmup_steps": 0,
        "seed": 0,
        "loss": "distillation",
        "temperature": 4.0,
        "alpha": 1.0,
    },
    "evaluation": {
        "dataset_id": "dst_e",
        "task": "auto",
        "top_k": 3,
        "batch_size": 256,
        "max_samples": None,
    },
}
TODAYS_CORE = JobSpec(
    pruning=PruningSpec(criterion="taylor", granularity="channel", sparsity=0.5),
    calibration=CalibrationSpec(num_samples=64),
    # The row's own weight decay and schedule (today's defaults differ) and no BatchNorm
    # re-estimation (added since): it replays as it ran.
    fine_tune=FineTuneSpec(
        epochs=2, loss="distillation", weight_decay=0.0, schedule="cosine", batchnorm_samples=0
    ),
    evaluation=EvaluationSpec(top_k=3),
)


def test_a_row_of_todays_shape_parses() -> None:
    spec, ids = parse_stored(TODAYS_ROW)
    assert spec == TODAYS_CORE
    assert ids == {"calibration": "dst_c", "fine_tune": "dst_f", "evaluation": "dst_e"}


def test_a_minimal_row_parses() -> None:
    # Sections and dry_run default: a row that stored only what it set still means the same.
    pruning = {"criterion": "l1", "granularity": "unstructured", "sparsity": 0.8}
    spec, ids = parse_stored({"pruning": pruning})
    assert spec == JobSpec(pruning=PruningSpec(**pruning))
    assert ids == {}


# The second round added `seq_len` to these sections and `width`/`depth` to `pruning` (language
# models); stored as null otherwise.
WITH_SEQ_LEN = {
    **TODAYS_ROW,
    "pruning": {**TODAYS_ROW["pruning"], "width": None, "depth": None},
    **{
        section: {**TODAYS_ROW[section], "seq_len": None}
        for section in ("calibration", "fine_tune", "evaluation")
    },
}
# Issue 14 added `target`/`search` to `pruning` and `sensitivity_only` beside `dry_run`.
WITH_TARGET = {
    **WITH_SEQ_LEN,
    "pruning": {**WITH_SEQ_LEN["pruning"], "target": None, "search": None},
    "sensitivity_only": False,
}
# Issue 12 changed the fine-tuning defaults a new request stores (AdamW's weight decay, a constant
# lr) and added BatchNorm re-estimation after pruning.
WITH_NEW_DEFAULTS = {
    **WITH_TARGET,
    "fine_tune": {
        **WITH_TARGET["fine_tune"],
        "weight_decay": 0.01,
        "schedule": "constant",
        "batchnorm_samples": 256,
    },
}


def test_the_stored_form_is_what_it_was() -> None:
    # What the request stores now equals, key for key, what the previous code stored, plus the
    # fields added since; a row of the previous shape still means the same.
    request = JobSpecRequest.model_validate(
        {
            "pruning": {"criterion": "taylor", "granularity": "channel", "sparsity": 0.5},
            "calibration": {"dataset_id": "dst_c", "num_samples": 64},
            "fine_tune": {"dataset_id": "dst_f", "epochs": 2, "loss": "distillation"},
            "evaluation": {"dataset_id": "dst_e", "top_k": 3},
        }
    )
    assert request.stored() == WITH_NEW_DEFAULTS
    assert parse_stored(request.stored()) == request.to_core()  # it round-trips
    # Rows stored before each addition still mean what they meant.
    assert parse_stored(TODAYS_ROW) == parse_stored(WITH_SEQ_LEN) == parse_stored(WITH_TARGET)
    assert parse_stored(TODAYS_ROW)[0] == TODAYS_CORE


@pytest.mark.parametrize(
    "broken",
    [
        {**TODAYS_ROW, "surprise": 1},
        {**TODAYS_ROW, "fine_tune": {**TODAYS_ROW["fine_tune"], "dataset_id": ""}},
        {**TODAYS_ROW, "calibration": None},  # taylor reads calibration data
    ],
)
def test_a_stored_spec_stays_strict(broken: dict) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- pydantic's ValidationError is a ValueError
        parse_stored(broken)


def test_a_submitted_job_stores_the_requests_spec(api: Api, resnet_pt2: Path) -> None:
    model = upload(api.client, resnet_pt2)
    pruning = {"criterion": "l2", "granularity": "unstructured", "sparsity": 0.3}
    job = api.client.post("/v1/jobs", json={"model_id": model["id"], "pruning": pruning}).json()
    with api.sessions() as session:
        stored = session.scalar(select(Job.spec).where(Job.id == job["id"]))
    assert stored == job["spec"]
    assert stored == JobSpecRequest.model_validate({"pruning": pruning}).stored()
    assert parse_stored(stored) == (JobSpec(pruning=PruningSpec(**pruning)), {})
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
