"""The benchmark's GPU arrays (python -m pycomm.bench --device gpu): cupy or torch CUDA arrays,
filled and checked through host copies, and timed up to the end of their GPU work.

cupy and torch are imported only when --device gpu asks for them: the CLI on host buffers never
imports either.
"""

import numpy as np

LIBRARIES = ("cupy", "torch")


class GpuUnavailable(RuntimeError):
    """No usable GPU library or no GPU: the CLI reports it as a usage error."""


class GpuArrays:
    """Allocates, fills, reads back and synchronises device arrays of one library on this rank's
    GPU (its index on the node modulo the GPUs it sees, as training scripts choose)."""

    def __init__(self, library, local_rank: int):
        """`library`: "cupy" or "torch"; None takes the first of them that sees a GPU."""
        names = [library] if library else list(LIBRARIES)
        errors = []
        for name in names:
            try:
                self._use(name, local_rank)
                return
            except Exception as error:  # a library that is missing, broken, or sees no usable GPU
                errors.append(f"{name}: {type(error).__name__}: {error}")
        raise GpuUnavailable("--device gpu needs cupy or torch with CUDA (" + "; ".join(errors) + ")")

    def _use(self, name: str, local_rank: int) -> None:
        if name == "cupy":
            import cupy

            count = cupy.cuda.runtime.getDeviceCount() if cupy.is_available() else 0
            if not count:
                raise ImportError("no GPU visible")
            self._device = local_rank % count
            cupy.cuda.Device(self._device).use()
            self._cupy = cupy
            self.device_name = cupy.cuda.runtime.getDeviceProperties(self._device)["name"].decode()
        else:
            import torch

            if not torch.cuda.is_available():
                raise ImportError("torch.cuda.is_available() is False")
            self._device = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(self._device)
            self._torch = torch
            self.device_name = torch.cuda.get_device_name(self._device)
        self.library = name

    def empty(self, count: int, dtype: np.dtype):
        """`count` elements of `dtype` on this rank's GPU, contents undefined."""
        if self.library == "cupy":
            if dtype.name == "bfloat16":
                raise GpuUnavailable("cupy has no bfloat16: use --gpu-library torch")
            return self._cupy.empty(count, dtype=dtype)
        torch = self._torch
        torch_dtype = getattr(torch, dtype.name, None)
        if torch_dtype is None:
            raise GpuUnavailable(f"torch {torch.__version__} has no {dtype.name}")
        raw = torch.empty(count * dtype.itemsize, dtype=torch.uint8, device=f"cuda:{self._device}")
        return raw.view(torch_dtype)

    def _bytes(self, x):
        return x.view(self._cupy.uint8) if self.library == "cupy" else x.view(self._torch.uint8)

    def upload(self, host: np.ndarray, x) -> None:
        """Copies `host` into `x` (same element count and dtype); blocks until it is there."""
        raw = host.view(np.uint8)
        if self.library == "cupy":
            self._bytes(x).set(raw)
        else:
            self._bytes(x).copy_(self._torch.from_numpy(raw))
        self.synchronize()

    def download(self, x, dtype: np.dtype) -> np.ndarray:
        """`x`'s elements in a new host array, once the work queued before has run."""
        raw = self._bytes(x).get() if self.library == "cupy" else self._bytes(x).cpu().numpy()
        return raw.view(dtype)

    def copy(self, dst, src) -> None:
        """Queues a copy of `src` into `dst` (same shape and dtype) on the current stream."""
        if self.library == "cupy":
            self._cupy.copyto(dst, src)
        else:
            dst.copy_(src)

    def synchronize(self) -> None:
        """Waits until the GPU work queued so far on the current stream has run."""
        if self.library == "cupy":
            self._cupy.cuda.get_current_stream().synchronize()
        else:
            self._torch.cuda.current_stream().synchronize()
