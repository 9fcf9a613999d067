"""`device: cuda`: the matrix methods (Iso-C, Iso-CTS, TSV-M) of 2-D keys on a CUDA GPU.

Each matrix key's base and fine-tuned tensors go to the GPU as they are stored (bf16 is
converted there), the core's own method code runs on its CUDA backend (isofast._cuda), and the
result comes back into the output the writer sends to disk. Vectors, excluded keys and the
elementwise methods run on the CPU as with `device: cpu` (they are bound by reading their
inputs, not by arithmetic). A machine without the CUDA backend, torch with CUDA or a usable
GPU fails at once, before any tensor is read, with the reason; so does a key whose GPU work
cannot fit in the GPU's free memory.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from isofast import arrays
from isofast.errors import BackendUnavailable, InsufficientMemory

if TYPE_CHECKING:  # the planner imports this module; the compiled core loads lazily
    from isofast._core import MergeOptions

log = logging.getLogger(__name__)

GPU_KERNELS = ("iso_c", "iso_cts", "tsv_m")


def gpu_for(device: str, kernel: str, method: str) -> CudaMatrixMerge | None:
    """None for `device: cpu`; else the GPU side, checked (raises BackendUnavailable with the
    reason). An elementwise method on a CUDA device runs on the CPU: None, after the check.
    `device` is normalised by the request: 'cpu' or 'cuda:N'."""
    if device == "cpu":
        return None
    gpu = CudaMatrixMerge(device)
    if kernel not in GPU_KERNELS:
        log.info("%s: %s is an elementwise method; it runs on the CPU", device, method)
        return None
    return gpu


def gpu_work_bytes(shape: tuple[int, ...], tasks: int, kernel: str, in_itemsize: int) -> int:
    """GPU memory one 2-D key takes while merged (float32 compute): the inputs as stored, the
    task matrices (one sum for Iso-C), the update and the output, the float64 Gram of the short
    side with its eigenvectors, and concatenated factors (about one matrix more)."""
    m, n = shape[0], shape[-1]
    numel, r = m * n, min(m, n)
    deltas = 1 if kernel == "iso_c" else tasks
    inputs = (tasks + 1) * numel * in_itemsize
    return inputs + (deltas + 3) * numel * 4 + 3 * r * r * 8


class CudaMatrixMerge:
    """The GPU side of a `device: cuda` merge (checks everything at construction)."""

    def __init__(self, device: str) -> None:
        index = int(device.removeprefix("cuda:"))
        try:
            from isofast import _cuda
            from isofast._native import core  # noqa: F401  (the checked core loads first)
        except ImportError as exc:
            raise BackendUnavailable(
                f"device {device!r}: this isofast was built without its CUDA backend ({exc}); "
                "rebuild where a CUDA toolkit with cuBLAS and cuSOLVER is found "
                "(ISOFAST_CUDA=ON), or use device: cpu"
            ) from None
        try:
            import torch
        except ImportError:
            raise BackendUnavailable(
                f"device {device!r}: moving tensors to the GPU needs PyTorch with CUDA"
            ) from None
        if not _cuda.available() or not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r}: no usable CUDA GPU on this machine")
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        self._cuda = _cuda
        self._torch = torch
        self.name = device
        self.device = torch.device("cuda", index)

    def free_bytes(self) -> int:
        free, _total = self._torch.cuda.mem_get_info(self.device)
        return int(free)

    def check_fits(self, name: str, shape: tuple[int, ...], need: int) -> None:
        """Refuse, before any data is read, a key whose GPU work exceeds the free memory."""
        free = self.free_bytes()
        if need > free:
            raise InsufficientMemory(
                f"tensor {name!r} {tuple(shape)} needs about {need / 2**30:.1f} GiB on "
                f"{self.name}, which has {free / 2**30:.1f} GiB free; merge it with device: cpu "
                "or free GPU memory"
            )

    def _to_gpu(self, array: Any) -> Any:
        torch = self._torch
        if arrays.is_torch(array):
            return array.to(self.device, non_blocking=True)
        bits = array.bits if isinstance(array, arrays.Bf16Array) else np.asarray(array)
        with warnings.catch_warnings():  # read-only memory maps: only read from, never written
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(bits))
        on_gpu = host.to(self.device)
        return on_gpu.view(torch.bfloat16) if isinstance(array, arrays.Bf16Array) else on_gpu

    def merge(self, base: Any, finetuned: list[Any], out: Any, options: MergeOptions) -> None:
        """out (host memory) = base + alpha * M(finetuned - base), computed on the GPU."""
        torch = self._torch
        bf16 = isinstance(out, arrays.Bf16Array)
        # The output's host memory seen by torch (bf16 bits as int16: numpy has no bfloat16).
        if arrays.is_torch(out):
            bf16 = out.dtype == torch.bfloat16
            host = out.view(torch.int16) if bf16 else out
        else:
            host = torch.from_numpy(out.bits.view(np.int16) if bf16 else out)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            result = torch.empty(
                host.shape, dtype=torch.bfloat16 if bf16 else host.dtype, device=self.device
            )
            self._cuda.merge_matrix(
                options,
                [self._to_gpu(ft) for ft in finetuned],
                result,
                base=self._to_gpu(base),
                stream=stream.cuda_stream,
            )
            host.copy_(result.view(torch.int16) if bf16 else result)  # waits for the stream

    def merge_on_device(
        self, base: Any, finetuned: list[Any], options: MergeOptions, out_dtype: str
    ) -> Any:
        """base + alpha * M for tensors already on this GPU (torch CUDA or cupy, zero-copy
        through DLPack on the current stream); returns a torch tensor on the same device."""
        torch = self._torch
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            shape = tuple(base.shape)
            result = torch.empty(shape, dtype=getattr(torch, out_dtype), device=self.device)
            if math.prod(shape):
                self._cuda.merge_matrix(
                    options, list(finetuned), result, base=base, stream=stream.cuda_stream
                )
            return result
