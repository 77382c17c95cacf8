"""Settings: keyword arguments first, then PYCOMM_* environment variables, then defaults."""

import os

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 8, 256 << 20  # as pycomm::kMinChunkBytes, kMaxChunkBytes


def _env(name: str):
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def timeout(value=None) -> float:
    """Seconds any single wait on a peer may last before PeerError (PYCOMM_TIMEOUT)."""
    raw = value if value is not None else _env("PYCOMM_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"pycomm: timeout must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"pycomm: timeout must be positive, got {raw!r}")
    return seconds


def chunk_bytes(value=None) -> int:
    """Pipeline chunk size in bytes (PYCOMM_CHUNK_BYTES); accepts suffixes K, M, G."""
    raw = value if value is not None else _env("PYCOMM_CHUNK_BYTES")
    if raw is None:
        return DEFAULT_CHUNK_BYTES
    size = parse_size(raw)
    if not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES:
        raise ValueError(
            f"pycomm: chunk_bytes must be from {MIN_CHUNK_BYTES} bytes to {MAX_CHUNK_BYTES >> 20}M, got {raw!r}"
        )
    return size


# Same order as pycomm::Algorithm in csrc/include/pycomm/pycomm.h.
ALGORITHMS = ("auto", "ring", "oneshot", "hierarchical", "singlecopy")
# Same order as pycomm::InterNode.
INTER_NODE = ("auto", "mpi", "ring")


def _choice(what, value, variable, choices) -> str:
    raw = value if value is not None else _env(variable)
    name = (raw or "auto").lower()
    if name not in choices:
        raise ValueError(f"pycomm: {what} must be one of {', '.join(choices)}, got {raw!r}")
    return name


def algorithm(value=None) -> str:
    """The allreduce algorithm (PYCOMM_ALGO): auto, or ring / oneshot / hierarchical / singlecopy to
    force one."""
    return _choice("algorithm", value, "PYCOMM_ALGO", ALGORITHMS)


def inter_node(value=None) -> str:
    """How the hierarchical allreduce moves slices between nodes (PYCOMM_INTER_NODE): auto, mpi
    (MPI_Iallreduce) or ring (pycomm's ring over MPI point-to-point)."""
    return _choice("inter_node", value, "PYCOMM_INTER_NODE", INTER_NODE)


def debug(value=None) -> bool:
    """Rank-prefixed debug lines on stderr (PYCOMM_DEBUG=1); a string reads as the variable does."""
    raw = value if value is not None else _env("PYCOMM_DEBUG")
    if raw is None or not isinstance(raw, str):
        return bool(raw)
    return raw.strip().lower() not in ("", "0", "false", "no", "off")


# Switches the core reads from the environment itself, and the values it understands.
_CORE_SWITCHES = {"PYCOMM_SHM": ("0", "1"), "PYCOMM_CMA": ("0", "1"), "PYCOMM_KERNELS": ("auto", "generic")}


def check_core_switches() -> None:
    """Refuses a value of PYCOMM_SHM, PYCOMM_CMA or PYCOMM_KERNELS that the core would ignore."""
    for name, values in _CORE_SWITCHES.items():
        raw = _env(name)
        if raw is not None and raw not in values:
            raise ValueError(f"pycomm: {name} must be {' or '.join(values)}, got {raw!r}")


def shm_switch() -> str:
    """PYCOMM_SHM as the core reads it (unset: on). Whether ranks share memory must be alike on
    every rank (PYCOMM_CMA need not be: ranks agree per call whether all can read each other)."""
    return _env("PYCOMM_SHM") or "1"


def timeline(value=None):
    """Where to write the Chrome trace of every call (PYCOMM_TIMELINE): a file path, or None."""
    raw = value if value is not None else _env("PYCOMM_TIMELINE")
    return None if raw in (None, "") else os.fspath(raw)


def parse_size(raw) -> int:
    """'8', '64K', '1M', '2G' -> bytes (powers of 1024)."""
    if isinstance(raw, bool):
        raise ValueError(f"pycomm: cannot read {raw!r} as a size in bytes")
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError(f"pycomm: a size in bytes cannot be negative, got {raw}")
        return raw
    text = str(raw).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            text, scale = text[:-1], factor
            break
    try:
        value = float(text) * scale
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf") and value == int(value)):
        raise ValueError(f"pycomm: cannot read {raw!r} as a whole, non-negative size in bytes")
    return int(value)
