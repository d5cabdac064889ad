"""The compose file and the Makefile name entry points that exist (no Docker engine runs here)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import yaml
from typer.main import get_command

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def check_entry_point(argv: list[str]) -> None:
    program = argv[0]
    if program == "uvicorn":
        target = next(a for a in argv[1:] if ":" in a and not a.startswith("-"))
        module, attr = target.split(":")
        factory = getattr(importlib.import_module(module), attr)
        assert callable(factory)
        assert "--factory" in argv
    elif program == "celery":
        module = argv[argv.index("-A") + 1]
        app = importlib.import_module(module).app
        assert "worker" in argv
        assert app.main == "shears"
    elif program == "shears":
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        module, attr = scripts["shears"].split(":")
        cli = get_command(getattr(importlib.import_module(module), attr))
        assert argv[1] in cli.commands  # type: ignore[attr-defined]
    else:
        raise AssertionError(f"unknown entry point {program!r}")


WORKERS = ("worker-gpu", "worker-cpu")


def test_compose_services_and_their_commands() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "migrate", "api", *WORKERS, "sweeper"} <= set(services)
    for name in ("migrate", "api", *WORKERS, "sweeper"):
        check_entry_point(services[name]["command"])
        env = services[name]["environment"]
        assert env["SHEARS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SHEARS_BROKER_URL"].startswith("redis://")
    assert services["migrate"]["command"][:2] == ["shears", "migrate"]
    for name in ("api", *WORKERS):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
        assert services[name]["depends_on"]["bucket"]["condition"] == (
            "service_completed_successfully"
        )


def test_gpu_workers_reserve_an_nvidia_gpu_and_cpu_workers_do_not() -> None:
    services = compose()["services"]
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["worker-cpu"]
    queues = {name: services[name]["command"][3].split(",") for name in WORKERS}
    env = services["api"]["environment"]
    assert env["SHEARS_GPU_QUEUE"] in queues["worker-gpu"]
    assert queues["worker-cpu"] == [env["SHEARS_QUEUE"]]


def test_compose_keeps_every_stored_byte_in_the_bucket() -> None:
    services = compose()["services"]
    for name in ("api", *WORKERS):
        env = services[name]["environment"]
        assert env["SHEARS_STORAGE_URL"].startswith("s3://")
        assert env["SHEARS_S3_ENDPOINT_URL"] == "http://minio:9000"
        # No volume at the data dir: nothing of a model or artifact can stay there.
        mounts = [v.split(":")[1] for v in services[name].get("volumes", [])]
        assert env["SHEARS_DATA_DIR"] not in mounts
        assert env["SHEARS_CACHE_DIR"] in mounts or name == "api"


def test_dockerfile_installs_pinned_torch_and_the_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile
    # Everything beside torch at the versions main was tested with, as `make install` does.
    assert "pip install -c constraints.txt -e ." in dockerfile
    assert "constraints.txt" in dockerfile.split("RUN pip install -c")[0]  # copied in first
    makefile = (ROOT / "Makefile").read_text()
    assert "install -c constraints.txt -e '.[dev]'" in makefile
    pins = (ROOT / "constraints.txt").read_text().split()
    assert not any(p.startswith(("torch==", "-e")) for p in pins)  # torch: the Makefile's pin
    assert "transformers==" in " ".join(pins)
    for package in ("api", "worker", "core", "shears", "migrations"):
        assert f"COPY {package} " in dockerfile


def test_ci_runs_make_test_and_readme_starts_with_the_two_commands() -> None:
    assert "make test" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.index("make test") + 20]
    assert "make run" in head
