"""The layering the design asks for: core is a plain library; shared persistence is web-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_alone_without_service_frameworks() -> None:
    code = (
        "import sys, core.pipeline, core.formats.pt2.gate\n"
        "bad = {'fastapi', 'celery', 'sqlalchemy', 'starlette', 'kombu'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_celery_app_module_stays_light_for_the_api() -> None:
    code = "import sys, worker.celery_app\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_benchmarks_and_examples_do_not_import_the_tests() -> None:
    # The tests may use what bench/ and examples/ share; never the other way round.
    import ast

    offenders = []
    for path in [*ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []
