"""Packaging: a fresh virtual environment gets a working install, regular or editable.

The project (pyproject.toml, README.md, multiverso_py/, tables/) is copied into tmp_path
first, so that building never writes into the checkout. The venv sees the base
interpreter's site-packages (numpy, msgpack, uvloop) and is checked from a neutral
working directory, so that nothing from the checkout or this test's own venv leaks in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPS = ("numpy", "msgpack", "uvloop")

# Run inside the fresh venv: what got installed, and does it work.
PROBE = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, sys, sysconfig
    import multiverso_py as mv
    import multiverso_py.tables
    import multiverso_py.tables.array
    from multiverso_py.tables.array import ArrayTable
    with mv.init(timeout=20):  # an embedded job: scheduler and server in this process
        table = ArrayTable(4, "int64")
        table.add([1, 2, 3, 4])
        values = table.get().tolist()
    spec = importlib.util.find_spec("tables")
    dist = importlib.metadata.distribution("multiverso-py")
    print(json.dumps({
        "prefix": sys.prefix,
        "purelib": sysconfig.get_paths()["purelib"],
        "tables_file": multiverso_py.tables.__file__,
        "array_table": ArrayTable is mv.ArrayTable,
        "values": values,
        "top_tables_origin": None if spec is None else str(spec.origin or spec.submodule_search_locations),
        "dist_top_names": sorted({str(f).split("/")[0] for f in dist.files or []}),
        "top_level_txt": dist.read_text("top_level.txt"),
    }))
""")


def clean_env() -> dict[str, str]:
    """No PYTHONPATH, user site or active venv from the outside."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
           and not k.startswith("MV_")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def copy_project(dest: Path) -> Path:
    dest.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dest)
    readme = REPO / "README.md"
    if readme.exists():
        shutil.copy2(readme, dest)
    else:  # pyproject names it; a stub keeps the build going where the checkout lacks one
        (dest / "README.md").write_text("# multiverso-py\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "multiverso_py", dest / "multiverso_py", ignore=ignore)
    shutil.copytree(REPO / "tables", dest / "tables", ignore=ignore)
    return dest


@pytest.mark.timeout(300)
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_fresh_venv_install(tmp_path: Path, editable: bool) -> None:
    project = copy_project(tmp_path / "project")
    venv = tmp_path / "venv"
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    # --without-pip skips ensurepip; this interpreter's pip installs into it via --python.
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, 120)
    python = venv / "bin" / "python"
    has_deps = subprocess.run([str(python), "-c", f"import {', '.join(DEPS)}"], cwd=neutral, env=clean_env(),
                              capture_output=True, timeout=60).returncode == 0
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    install += ["--no-deps"] if has_deps else []  # the base interpreter's packages suffice
    install += ["-e", str(project)] if editable else [str(project)]
    run(install, tmp_path, 240)

    probe = json.loads(run([str(python), "-c", PROBE], neutral, 60).stdout.strip().splitlines()[-1])
    assert Path(probe["prefix"]) == venv
    assert probe["array_table"] is True
    assert probe["values"] == [1, 2, 3, 4]
    tables_file = Path(probe["tables_file"]).resolve()
    if editable:
        assert tables_file == (project / "tables" / "__init__.py").resolve()
    else:
        assert tables_file == (Path(probe["purelib"]) / "multiverso_py" / "tables" / "__init__.py").resolve()

    # No top-level `tables` (PyTables' name): not importable from anything we installed...
    origin = probe["top_tables_origin"]
    assert origin is None or not any(str(p) in origin for p in (venv, project)), \
        f"a top-level 'tables' import is installed: {origin}"
    # ...not in site-packages, not in the distribution's files.
    site = Path(probe["purelib"])
    clobbering = [p.name for p in site.iterdir() if p.name.lower().startswith("tables")]
    assert clobbering == [], f"site-packages holds {clobbering}"
    assert "tables" not in probe["dist_top_names"], probe["dist_top_names"]
    if probe["top_level_txt"] is not None:
        assert "tables" not in probe["top_level_txt"].split(), probe["top_level_txt"]

    # The console script works outside the checkout.
    script = venv / "bin" / "multiverso-py"
    assert script.exists()
    help_text = run([str(script), "--help"], neutral, 60).stdout
    assert help_text.startswith("usage: multiverso-py"), help_text
    for command in ("scheduler", "server", "run"):
        assert command in help_text
