"""`python -m qlin_cli ARGS` in a child process, without paying for its imports each time.

A fresh `python -m qlin_cli` spends 2-5 s importing torch and transformers before it reads its
first argument; the memory tests (test_hostile_*.py) run ~40 of them. Here one server process
imports what `python -m qlin_cli` imports (the spin variables set first, as entry.main sets them
before torch loads), then forks one child per command. The child is a real process: it runs
qlin's own entry point (`runpy` on `qlin_cli.__main__`, as `python -m` does) in its own working
folder, under its own address-space limit, with stdin from /dev/null and stdout and stderr in
files, and ends with the exit code the command chose after the interpreter's exit callbacks ran.
Its peak resident memory (wait4) counts the pages it inherited from the server, as a fresh
process counts its imports: a command's peak is comparable with another's.

What a fork cannot stand for is tested with true subprocesses elsewhere: a signal during the
imports, environment variables read at import (test_interrupts.py, test_entry.py, test_native.py,
conftest.subprocess_qlin). What the imports print is checked here once: the server refuses to
start if importing qlin wrote anything on stderr.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import qlin_env

SERVER = r"""
import gc, json, os, resource, runpy, signal, sys, time
from qlin_cli import entry
os.environ.update(entry.short_spin(os.environ))
import torch
import qlin_cli.cli
import qlin_cli.errors
try:  # what a Hugging Face folder's command imports, as qlin imports it (HF_HUB_OFFLINE=1 first)
    import qlin_cli.hf
    qlin_cli.hf._import_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM
except (ImportError, qlin_cli.errors.InputError):
    pass
sys.stdout.flush()  # anything the imports printed arrives before "ready": the server refuses to start
requests = os.fdopen(0, "r")
answers = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
gc.freeze()  # the children leave the imported objects alone: no copy of their pages at each collection
answers.write("ready\n")
answers.flush()
for line in requests:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the command: what escapes it (SystemExit, an exception) ends this process as it would end python -m
        requests.close()
        answers.close()
        os.chdir(job["cwd"])
        if job["limit"]:
            resource.setrlimit(resource.RLIMIT_AS, (job["limit"], job["limit"]))
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job["out"], os.O_WRONLY), (2, job["err"], os.O_WRONLY)):
            os.dup2(os.open(path, flags), fd)
        sys.path[0] = job["cwd"]  # python -m puts the working folder first
        sys.argv = ["qlin", *job["args"]]
        runpy.run_module("qlin_cli", run_name="__main__", alter_sys=True)
        sys.exit(0)
    deadline = time.monotonic() + job["timeout"]
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    answers.write(json.dumps({"code": os.waitstatus_to_exitcode(status), "peak_mb": usage.ru_maxrss / 1024}) + "\n")
    answers.flush()
"""

_servers: dict[tuple, subprocess.Popen] = {}  # by environment: torch and qlin read some variables at import


def _start(env: dict[str, str]) -> subprocess.Popen:
    key = tuple(sorted(env.items()))
    server = _servers.get(key)
    if server is None or server.poll() is not None:
        with tempfile.TemporaryFile() as err:
            server = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=err, text=True)
            ready = server.stdout.readline()
            err.seek(0)
            said = err.read().decode()
        if ready != "ready\n" or said:
            server.kill()
            raise RuntimeError(f"the warm qlin server did not start cleanly: {ready!r}, stderr {said!r}")
        if not _servers:
            atexit.register(_stop)
        _servers[key] = server
    return server


def _stop() -> None:
    for server in _servers.values():
        if server.poll() is None:
            server.stdin.close()
            server.wait(timeout=30)


def run_warm(*args, cwd: Path, timeout: float = 90, address_limit: int | None = None) -> tuple[int, str, str, float]:
    """Run `python -m qlin_cli ARGS` in `cwd` as a child of the warm server: (exit code, stdout,
    stderr, peak resident MB of that child). A child past `timeout` seconds is killed (-9)."""
    from qlin_cli.entry import short_spin

    # pytest changes PYTEST_CURRENT_TEST at each test; torch's inductor sets its cache folder once
    # it is used in this process (a server per value would start one per test, or a second one)
    env = {k: v for k, v in qlin_env().items() if k not in ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")}
    # what qlin sets in its own environment before torch and transformers load (entry.main,
    # hf._import_transformers), also set in this process by in-process tests that ran them
    env.update({**short_spin(env), "HF_HUB_OFFLINE": "1"})
    server = _start(env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "out"), Path(tmp, "err")
        out.touch()
        err.touch()
        server.stdin.write(json.dumps({"args": [str(a) for a in args], "cwd": str(cwd), "out": str(out),
                                       "err": str(err), "limit": address_limit, "timeout": timeout}) + "\n")
        server.stdin.flush()
        answer = json.loads(server.stdout.readline())
        return answer["code"], out.read_bytes().decode(), err.read_bytes().decode(), answer["peak_mb"]


def warm_subprocess_qlin(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`run_warm` as conftest.subprocess_qlin answers: a CompletedProcess with the exit code,
    stdout and stderr (for the entry-point tests whose point is the process's exit, not its
    imports)."""
    code, out, err, _ = run_warm(*args, cwd=cwd, timeout=120)
    return subprocess.CompletedProcess(["qlin", *map(str, args)], code, out, err)
