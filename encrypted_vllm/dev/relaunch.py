"""Runs the project's scripts with the Python that has their dependencies.

`bash setup.sh` installs everything into `.venv`; a newcomer then types
`python3 client.py ...` as every printed command says. A script first
checks (`require`, which imports nothing) that its packages are there; if
one is not, `relaunch_in_venv` starts the script again with `.venv`'s
Python, same arguments, or, without a `.venv`, says which package is
missing and to run `bash setup.sh` first, instead of a traceback. In the
image the packages are installed system-wide, so nothing is relaunched.

This module imports only the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import NoReturn

# The checkout this package is in, where setup.sh makes .venv.
ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def _in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV_PYTHON.parent.parent.resolve()


def require(*packages: str) -> None:
    """ModuleNotFoundError for the first of these packages that is missing."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)


def relaunch_in_venv(missing: ModuleNotFoundError, module_name: str) -> NoReturn:
    """Called by a script's failed import; `module_name` is its `__name__`."""
    if module_name == "__main__" and VENV_PYTHON.is_file() and not _in_venv():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])
    hint = f"the Python package {missing.name!r} is not installed here: run `bash setup.sh` first"
    if module_name != "__main__":
        raise ModuleNotFoundError(f"{hint} (then use .venv/bin/python)", name=missing.name)
    print(f"error: {hint}", file=sys.stderr)
    sys.exit(2)


def ensure(module_name: str, *packages: str) -> None:
    """Returns if these packages can be imported; else, for a script
    (`module_name` is its `__name__`), starts it again in `.venv` or exits
    with the hint, and for an import raises ModuleNotFoundError with it."""
    try:
        require(*packages)
    except ModuleNotFoundError as missing:
        relaunch_in_venv(missing, module_name)
