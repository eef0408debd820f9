"""The `qlin` console script sets a short OpenMP spin before torch loads, unless the user chose one."""

import os
import subprocess
import sys

import pytest

from qlin_cli.entry import SHORT_SPIN, SPIN_VARIABLES, short_spin


def test_short_spin_when_the_user_set_none():
    assert short_spin({"PATH": "/bin", "OMP_NUM_THREADS": "2"}) == {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    assert short_spin({}) is not SHORT_SPIN  # a copy: the caller may change it


@pytest.mark.parametrize("name", SPIN_VARIABLES)
def test_a_user_setting_is_kept_whole(name):
    # one variable set by the user (even empty) means qlin sets none of them
    assert short_spin({name: ""}) == {}
    assert short_spin({name: "PASSIVE" if name == "OMP_WAIT_POLICY" else "5"}) == {}


PROBE = """
import atexit, os, sys
import qlin_cli.entry
assert "torch" not in sys.modules, "qlin_cli.entry imported torch"
def show():
    sys.stderr.write("SPIN %s %s %s\\n" % (os.environ.get("GOMP_SPINCOUNT"), os.environ.get("KMP_BLOCKTIME"),
                                          os.environ.get("OMP_WAIT_POLICY")))
atexit.register(show)
sys.argv = ["qlin", "inspect", "/nonexistent/model.pt"]
qlin_cli.entry.main()
"""


def _spin_seen(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in SPIN_VARIABLES}
    env.update(env_extra, CI="true")
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # the missing file: a user error, after torch loaded
    assert "Traceback" not in done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("SPIN ")][-1]


def test_the_command_sets_it_before_torch_loads():
    assert _spin_seen({}) == "SPIN 1000 0 None"


def test_the_command_keeps_the_users_choice():
    assert _spin_seen({"OMP_WAIT_POLICY": "PASSIVE"}) == "SPIN None None PASSIVE"
    assert _spin_seen({"GOMP_SPINCOUNT": "30000"}) == "SPIN 30000 None None"
