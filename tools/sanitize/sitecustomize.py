"""Imported by every Python process of tools/sanitize.sh's run (its staging directory is first on
PYTHONPATH); never installed.

The sanitized pycomm._core needs libasan and libubsan loaded before anything else, so this module
re-executes the interpreter with them in LD_PRELOAD, then takes them out of os.environ again: Python
processes started by the tests (mpirun's ranks, `python -m ...`) get them the same way, while other
programs do not inherit them (pgrep hangs with libasan preloaded, for one).

It also drops the import hook of an editable install of pycomm, which would load its own _core.
"""

import os
import sys

_libs = os.environ.get("PYCOMM_SANITIZER_PRELOAD", "")
if _libs:
    _preload = os.environ.get("LD_PRELOAD", "")
    if not _preload.startswith(_libs):
        os.environ["LD_PRELOAD"] = f"{_libs} {_preload}".strip()
        sys.stdout.flush()
        os.execv(sys.executable, sys.orig_argv)
    _rest = _preload[len(_libs) :].strip()
    if _rest:
        os.environ["LD_PRELOAD"] = _rest
    else:
        del os.environ["LD_PRELOAD"]

sys.meta_path[:] = [
    finder for finder in sys.meta_path if "pycomm._core" not in (getattr(finder, "known_wheel_files", None) or {})
]
