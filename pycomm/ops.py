"""Reduction operators."""

import enum


class ReduceOp(enum.IntEnum):
    """Reduction operators; the values are the native core's codes."""

    SUM = 0
    PROD = 1
    MIN = 2
    MAX = 3
    AVG = 4  # sum divided by the communicator size; floating-point dtypes only


_BY_NAME = {o.name.lower(): o for o in ReduceOp}


def parse_op(op) -> ReduceOp:
    """Accepts a ReduceOp or its name in any case ("sum", "AVG")."""
    if isinstance(op, ReduceOp):
        return op
    found = _BY_NAME.get(op) if isinstance(op, str) else None
    if found is not None:
        return found
    if isinstance(op, str):
        try:
            return ReduceOp[op.upper()]
        except KeyError:
            pass
    names = ", ".join(repr(o.name.lower()) for o in ReduceOp)
    raise ValueError(f"pycomm: unknown op {op!r}; use one of {names}")
