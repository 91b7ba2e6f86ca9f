"""The console scripts answer Ctrl-C from their first line: status 130 and one line, never a
traceback, also while ``import dsc_jax`` and JAX are still being imported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from tests._train_utils import REPO, time_limit

DELAYS_S = (0.3, 0.5, 0.7, 1.0)  # importing JAX takes longer than the first of these
IMPORT_PHASE = "received during start-up: stopped, nothing was trained"


def console_script(name: str) -> str:
    """The wrapper pip writes for ``[project.scripts]`` entry ``name`` (run with ``-c``),
    built from ``pyproject.toml`` so that the test needs no reinstall."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, func = target.split(":")
    return (
        f"import sys\nfrom {module} import {func}\n"
        f"if __name__ == '__main__':\n    sys.argv[0] = {name!r}\n    sys.exit({func}())\n"
    )


def interrupted_after(delay_s: float, workdir: str) -> subprocess.CompletedProcess:
    """``dsc-train`` on the tiny config, sent SIGINT ``delay_s`` after it started."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            console_script("dsc-train"),
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(delay_s)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=time_limit(120))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow  # spawns processes
def test_ctrl_c_while_dsc_train_imports_exits_130_with_one_line(tmp_path):
    phases = []
    for delay in DELAYS_S:
        workdir = str(tmp_path / f"run-{delay}")
        result = interrupted_after(delay, workdir)
        output = f"after {delay} s:\n{result.stderr}"
        assert result.returncode == 128 + signal.SIGINT, output
        assert "Traceback" not in result.stderr, output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        [line] = [line for line in lines if line.startswith("dsc-train:")]
        in_imports = IMPORT_PHASE in line
        if in_imports:  # nothing else has been printed yet
            assert lines == [line], output
        phases.append(in_imports)
        assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")), output
    assert phases[0], "the first signal did not arrive while the command was importing"
