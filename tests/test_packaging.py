"""The installed distribution: one import namespace that nobody else's packages can take over.

A real wheel of edgefleet is installed into a fresh virtualenv next to a throwaway distribution
that ships top-level `agent` and `server` packages (common names); both must import, and
removing the other one must leave edgefleet whole.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _pip(*args: str | Path) -> str:
    # The test virtualenv's pip and build backend, offline: nothing is downloaded here.
    return _run(sys.executable, "-m", "pip", "--disable-pip-version-check", *args)


def _squatter(root: Path) -> Path:
    """Source tree of a distribution whose import packages are literally `agent` and `server`."""
    (root / "agent").mkdir(parents=True)
    (root / "server").mkdir()
    (root / "agent" / "__init__.py").write_text('OWNER = "squatter"\n')
    (root / "server" / "__init__.py").write_text('OWNER = "squatter"\n')
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "squatter"
            version = "1.0"

            [tool.setuptools]
            packages = ["agent", "server"]
            """
        )
    )
    return root


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """edgefleet's own wheel, built from this checkout, and the squatter's."""
    out = tmp_path_factory.mktemp("wheels")
    squatter = _squatter(tmp_path_factory.mktemp("squatter"))
    for src in (REPO, squatter):
        _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src)
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"edgefleet", "squatter"}, found
    return found


def _venv(path: Path) -> Path:
    """A bare virtualenv that sees this one's third-party packages but not its edgefleet."""
    _run(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    # Appended after the new venv's own site-packages (a .pth line), so what is installed
    # there wins; .pth files inside the reused directory (our editable install's) do not run.
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "_reuse_test_deps.pth").write_text(ours + "\n")
    return python


def test_edgefleet_and_a_distribution_with_top_level_agent_and_server_both_import(
    tmp_path: Path, wheels: dict[str, Path]
) -> None:
    python = _venv(tmp_path / "venv")
    _pip("--python", python, "install", "--no-deps", "-q", wheels["squatter"], wheels["edgefleet"])
    probe = textwrap.dedent(
        """
        import agent, server, edgefleet, edgefleet.agent, edgefleet.server.cli
        from edgefleet.agent.bundle import verify_bundle
        assert agent.OWNER == server.OWNER == "squatter", (agent.__file__, server.__file__)
        import sysconfig
        site = sysconfig.get_paths()["purelib"]
        for mod in (edgefleet, edgefleet.agent, edgefleet.server):
            assert mod.__file__.startswith(site), (mod.__file__, site)
        print(edgefleet.__version__)
        """
    )
    version = _run(python, "-c", probe, cwd=tmp_path).strip()
    assert version and version != "0+unknown"
    bin_dir = python.parent
    assert version in _run(bin_dir / "edgefleet-agent", "--version")

    # Removing the other distribution removes only its files.
    _pip("--python", python, "uninstall", "-y", "-q", "squatter")
    _run(python, "-c", "import edgefleet.agent.service, edgefleet.server.fleet.api", cwd=tmp_path)
    gone = subprocess.run(
        [python, "-c", "import agent"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert gone.returncode != 0 and "No module named 'agent'" in gone.stderr


def test_a_script_beside_files_named_agent_and_server_does_not_shadow_edgefleet(
    tmp_path: Path,
) -> None:
    # `python bench/agent.py` puts bench/ first on sys.path: a local agent.py used to shadow
    # the package ('agent' is not a package).
    (tmp_path / "agent.py").write_text("raise SystemExit('the local agent.py was imported')\n")
    (tmp_path / "server.py").write_text("raise SystemExit('the local server.py was imported')\n")
    script = tmp_path / "use_edgefleet.py"
    script.write_text(
        "import edgefleet.agent.config, edgefleet.server.paths\nprint('ok')\n"
    )
    assert _run(sys.executable, script, cwd=tmp_path).strip() == "ok"
