"""Runs command lines with ``--help``, paying the torch import once: ``tests/test_repo.py`` hands
it the documented command lines (JSON on stdin) and reads back, per command, its exit code and
what it printed (JSON on stdout).

Each command runs in a child forked from this process after the heavy third-party imports, as
``python -m`` or ``python script.py`` would run it (``runpy``, ``sys.argv`` set, its own stdout
and stderr), so a command that fails to import, to parse, or to print its usage fails here as it
would on a command line, without 23 interpreters each importing torch on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback

import matplotlib
import numpy  # noqa: F401
import PIL.Image  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401

matplotlib.use("Agg")


def _child(cmd: list[str], out: int, err: int) -> int:
    os.dup2(out, 1)
    os.dup2(err, 2)
    try:
        if cmd[0] == "-m":
            sys.argv = [cmd[1], *cmd[2:], "--help"]
            runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(cmd[0])
            sys.path.insert(0, os.path.dirname(script))
            sys.argv = [script, *cmd[1:], "--help"]
            runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run(cmd: list[str]) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os._exit(_child(cmd, out.fileno(), err.fileno()))
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {
            "cmd": cmd,
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read().decode("utf-8", "replace"),
            "stderr": err.read().decode("utf-8", "replace"),
        }


if __name__ == "__main__":
    commands = json.load(sys.stdin)
    sys.stdout.flush()
    print(json.dumps([run(cmd) for cmd in commands]))
