"""The server launcher prepares the metrics' multi-process directory before anything imports
``prometheus_client`` (issue 21): otherwise every worker would count only its own requests.
Each check runs in a fresh interpreter, as ``python main.py`` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from entrypoints.settings import ConfigError
from tests.support import REPO, make_settings


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **env})


def test_the_command_line_does_not_import_the_prometheus_client_before_serving() -> None:
    result = python("import sys, entrypoints.cli, entrypoints.server, entrypoints.operations\n"
                    "print('prometheus_client' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_launcher_empties_the_metrics_directory_and_points_the_client_at_it(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"old values")
    (directory / "keep.txt").write_text("not ours")
    result = python(
        "import os, sys\n"
        "from entrypoints.settings import Settings\n"
        "from entrypoints.server import prepare_metrics_directory\n"
        "path, temporary = prepare_metrics_directory(Settings.from_env())\n"
        "import prometheus_client.values as values\n"
        "print(path, temporary, os.environ['PROMETHEUS_MULTIPROC_DIR'], values.ValueClass.__name__)\n",
        MANAGEMENT_METRICS_DIR=str(directory), MANAGEMENT_DB_PATH=str(tmp_path / "db.sqlite3"))
    assert result.returncode == 0, result.stderr
    path, temporary, env, value_class = result.stdout.split()
    assert (path, temporary, env) == (str(directory), "False", str(directory))
    assert value_class != "MutexValue"  # the multi-process value class, not the in-process one
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


def test_without_a_directory_the_launcher_makes_a_private_temporary_one(tmp_path: Path) -> None:
    result = python("import os, stat\n"
                    "from entrypoints.settings import Settings\n"
                    "from entrypoints.server import prepare_metrics_directory\n"
                    "path, temporary = prepare_metrics_directory(Settings.from_env())\n"
                    "print(temporary, oct(stat.S_IMODE(os.stat(path).st_mode)), os.listdir(path))\n"
                    "os.rmdir(path)\n", MANAGEMENT_DB_PATH=str(tmp_path / "db.sqlite3"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "0o700", "[]"]


@pytest.mark.parametrize("token", ["short", "x" * 31, "has space " * 4, "é" * 40])
def test_a_weak_or_malformed_metrics_token_stops_start_up(tmp_path: Path, token: str) -> None:
    with pytest.raises(ConfigError, match="MANAGEMENT_METRICS_TOKEN"):
        make_settings(tmp_path, MANAGEMENT_METRICS_TOKEN=token)


def test_metrics_settings_have_their_defaults_and_bounds(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert settings.metrics_token is None and settings.metrics_min_interval == 10.0 and settings.metrics_dir is None
    assert make_settings(tmp_path, MANAGEMENT_METRICS_TOKEN="a" * 32).metrics_token == "a" * 32
    with pytest.raises(ConfigError, match="MANAGEMENT_METRICS_MIN_INTERVAL"):
        make_settings(tmp_path, MANAGEMENT_METRICS_MIN_INTERVAL="-1")
    assert "a" * 32 not in repr(make_settings(tmp_path, MANAGEMENT_METRICS_TOKEN="a" * 32))
