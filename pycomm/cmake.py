"""Where the installed C++ package lives, for C++ projects that embed pycomm (`find_package(pycomm)`).

    cmake -S <project> -B build -Dpycomm_DIR="$(python -m pycomm.cmake)"
    cmake -S <project> -B build -DCMAKE_PREFIX_PATH="$(python -m pycomm.cmake --prefix)"

The wheel carries the public header (include/pycomm/pycomm.h), the static libraries (lib/) and the
CMake package (lib/cmake/pycomm/) inside the installed package directory.
"""

import argparse
import sys
import sysconfig
from pathlib import Path

_CONFIG = Path("lib", "cmake", "pycomm", "pycommConfig.cmake")


def _candidates():
    # From a source checkout the package's __path__ lists the checkout first and the installed
    # package after it (see __init__.py); an editable install keeps its built files in site-packages.
    from . import __path__ as package_path

    yield from (Path(entry) for entry in package_path)
    for scheme_path in ("platlib", "purelib"):
        yield Path(sysconfig.get_path(scheme_path), "pycomm")


def get_prefix() -> str:
    """The directory to add to CMAKE_PREFIX_PATH (it holds include/, lib/ and lib/cmake/pycomm/)."""
    for prefix in _candidates():
        if (prefix / _CONFIG).is_file():
            return str(prefix.resolve())
    raise FileNotFoundError(
        "pycomm's CMake package is not installed next to this Python package (built with "
        "PYCOMM_INSTALL=OFF?). Reinstall pycomm with pip, or build and install the C++ core with CMake "
        "(README: Embedding in C++)."
    )


def get_cmake_dir() -> str:
    """The directory that holds pycommConfig.cmake: pass it as -Dpycomm_DIR=..."""
    return str(Path(get_prefix(), _CONFIG.parent))


def get_include() -> str:
    """The directory that holds pycomm/pycomm.h."""
    return str(Path(get_prefix(), "include"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pycomm.cmake", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cmakedir", action="store_true", help="the directory of pycommConfig.cmake (the default)")
    which.add_argument("--prefix", action="store_true", help="the prefix to add to CMAKE_PREFIX_PATH")
    which.add_argument("--includedir", action="store_true", help="the directory that holds pycomm/pycomm.h")
    args = parser.parse_args(argv)
    try:
        print(get_prefix() if args.prefix else get_include() if args.includedir else get_cmake_dir())
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
