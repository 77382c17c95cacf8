"""The element types pycomm reduces, and their codes in the native core."""

import numpy as np

# Same order as pycomm::DataType in csrc/include/pycomm/pycomm.h.
_CODES = {
    "float16": 0,
    "bfloat16": 1,  # ml_dtypes.bfloat16 (and torch.bfloat16)
    "float32": 2,
    "float64": 3,
    "int8": 4,
    "uint8": 5,
    "int32": 6,
    "int64": 7,
    "uint32": 8,
    "uint64": 9,
}

SUPPORTED = tuple(_CODES)
FLOATING = ("float16", "bfloat16", "float32", "float64")
FLOATING_CODES = frozenset(_CODES[name] for name in FLOATING)


# dtype objects seen before -> code; dtype.name costs microseconds, a dict hit does not.
_CODE_CACHE = {}


def dtype_code(dtype: np.dtype) -> int:
    """Returns the native code of `dtype`; TypeError if pycomm cannot reduce it."""
    code = _CODE_CACHE.get(dtype)
    if code is None:
        code = _CODE_CACHE[dtype] = _lookup(dtype)
    return code


def known_code(dtype):
    """The code of a dtype that dtype_code() has accepted before, else None (for fast paths)."""
    return _CODE_CACHE.get(dtype)


def _lookup(dtype: np.dtype) -> int:
    code = _CODES.get(dtype.name)
    if code is None or dtype.fields is not None:
        raise TypeError(f"pycomm: dtype {dtype} is not supported; use one of {', '.join(SUPPORTED)}")
    if not dtype.isnative:
        raise TypeError(f"pycomm: dtype {dtype} is not in native byte order")
    return code


def is_floating(dtype: np.dtype) -> bool:
    return dtype.name in FLOATING
