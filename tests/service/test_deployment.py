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


def test_compose_services_and_their_commands() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "sweeper"} <= set(services)
    for name in ("migrate", "api", "worker", "sweeper"):
        check_entry_point(services[name]["command"])
        env = services[name]["environment"]
        assert env["SHEARS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["SHEARS_BROKER_URL"].startswith("redis://")
    assert services["migrate"]["command"][:2] == ["shears", "migrate"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_worker_reserves_an_nvidia_gpu() -> None:
    devices = compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_dockerfile_installs_pinned_torch_and_the_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile
    assert "pip install -e ." in dockerfile or "pip install ." in dockerfile
    for package in ("api", "worker", "core", "shears", "migrations"):
        assert f"COPY {package} " in dockerfile


def test_ci_runs_make_test_and_readme_starts_with_the_two_commands() -> None:
    assert "make test" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.index("make test") + 20]
    assert "make run" in head
