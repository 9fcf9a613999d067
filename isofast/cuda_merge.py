"""`device: cuda` for merges of checkpoints on disk: Iso-C of 2-D keys on a CUDA GPU.

Each matrix key's base and fine-tuned tensors are copied to the GPU, merged there by the CUDA
backend (isofast._cuda: the certified polar iteration, float64), and the result is copied back
into the output the writer sends to disk. Everything else (vectors, excluded keys) merges on
the CPU as with `device: cpu`. Only Iso-C has a GPU kernel so far; the other methods, or a
machine without the CUDA backend, torch with CUDA or a usable GPU, fail before any tensor is
read, with the reason.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from isofast import arrays
from isofast.errors import BackendUnavailable

GPU_KERNELS = ("iso_c",)


def gpu_for(device: str, kernel: str, method: str) -> CudaIsoC | None:
    """None for `device: cpu`; else the GPU side, checked (raises with the reason). `device` is
    normalised by the request: 'cpu' or 'cuda:N'."""
    return None if device == "cpu" else CudaIsoC(device, kernel, method)


class CudaIsoC:
    """The GPU side of a `device: cuda` merge (checks everything at construction)."""

    def __init__(self, device: str, kernel: str, method: str) -> None:
        index = int(device.removeprefix("cuda:"))
        if kernel not in GPU_KERNELS:
            raise BackendUnavailable(
                f"device {device!r}: only {', '.join(GPU_KERNELS)} runs on the GPU so far; "
                f"method {method!r} runs on the CPU (device: cpu)"
            )
        try:
            from isofast import _cuda
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
        self.device = torch.device("cuda", index)

    def _to_gpu(self, array: Any) -> Any:
        torch = self._torch
        if arrays.is_torch(array):
            return array.to(self.device)
        bits = array.bits if isinstance(array, arrays.Bf16Array) else np.asarray(array)
        with warnings.catch_warnings():  # read-only memory maps: only read from, never written
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(bits))
        on_gpu = host.to(self.device)
        return on_gpu.view(torch.bfloat16) if isinstance(array, arrays.Bf16Array) else on_gpu

    def merge(
        self, base: Any, finetuned: list[Any], out: Any, alpha: float, rank_tol: float | None
    ) -> None:
        """out = base + alpha * Iso-C(finetuned - base), computed on the GPU."""
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
            self._cuda.iso_c(
                [self._to_gpu(ft) for ft in finetuned],
                result,
                base=self._to_gpu(base),
                alpha=alpha,
                rank_tol=rank_tol,
                stream=stream.cuda_stream,
            )
            host.copy_(result.view(torch.int16) if bf16 else result)  # waits for the stream
