"""The compiled program on IREE's runtime (torch-free): load a VMFB + parameter archives.

One `Runner` per device. It calls `prefill_bs{N}` / `decode_bs{N}` with numpy inputs; the KV cache is a
global of the program in this runner's VM context, updated in place by every call (it never comes back
to the host unless asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import iree.runtime as rt

from models.abi import ModelABI



@dataclass
class DecodeOut:
    """Full logits [B, V] (f32), or with on-device top-k: values/indices [B, K]."""
    logits: np.ndarray | None = None
    top_values: np.ndarray | None = None
    top_indices: np.ndarray | None = None


class Runner:
    def __init__(self, vmfb: Path, parameters: list[Path], abi: ModelABI, page_count: int | None = None,
                 driver: str = "local-task", device_index: int = 0):
        self.abi = abi
        held = abi.paged_kv_cache.device_block_count
        self.page_count = page_count or held
        if not 2 <= self.page_count <= held:
            raise ValueError(f"{self.page_count} KV pages asked for; the program holds {held} (page 0 is the "
                             f"padding page): use 2..{held}, or re-export with --device-block-count")
        self.instance = rt.VmInstance()
        self.device = _device(driver, device_index)
        index = rt.ParameterIndex()
        for p in parameters:
            index.load(str(p))
        params = rt.create_io_parameters_module(self.instance, index.create_provider(scope="model"))
        hal = rt.create_hal_module(self.instance, self.device)
        self.module = rt.VmModule.mmap(self.instance, str(vmfb))
        self.context = rt.VmContext(self.instance, [hal, params, self.module])
        self._fns: dict[str, rt.FunctionInvoker] = {}

    def _fn(self, name: str) -> rt.FunctionInvoker:
        if name not in self._fns:
            f = self.module.lookup_function(name)
            if f is None:
                raise ValueError(f"the VMFB has no function {name!r}; exported: {self.function_names()}")
            self._fns[name] = rt.FunctionInvoker(self.context, self.device, f)
        return self._fns[name]

    def function_names(self) -> list[str]:
        return [n for n in self.module.function_names if n.startswith(("prefill_bs", "decode_bs"))]

    def prefill(self, tokens: np.ndarray, start_positions: np.ndarray, seq_lens: np.ndarray,
                page_ids: np.ndarray) -> np.ndarray:
        """tokens [N, S] (S a multiple of the page size) -> last-position logits [N, V]."""
        out = self._fn(f"prefill_bs{tokens.shape[0]}")(
            _i64(tokens), _i64(start_positions), _i64(seq_lens), _i64(page_ids))
        return out.to_host()

    def embed(self, tokens: np.ndarray, start_positions: np.ndarray, seq_lens: np.ndarray,
              page_ids: np.ndarray) -> np.ndarray:
        """prefill that returns every position's final-normed hidden states [N, S, H] (f32)."""
        if not self.abi.has_embed:
            raise ValueError("this export has no embed_bs{N} entry points; re-export it with this version "
                             "of export.paged_llm to serve embeddings")
        out = self._fn(f"embed_bs{tokens.shape[0]}")(
            _i64(tokens), _i64(start_positions), _i64(seq_lens), _i64(page_ids))
        return out.to_host().astype(np.float32, copy=False)

    def decode(self, tokens: np.ndarray, seq_lens: np.ndarray, page_ids: np.ndarray) -> DecodeOut:
        """One token per sequence at position seq_lens - 1 (seq_len 0: an unused, padding slot)."""
        seq_lens = _i64(seq_lens)
        out = self._fn(f"decode_bs{tokens.shape[0]}")(_i64(tokens).reshape(-1, 1), seq_lens, seq_lens - 1,
                                                      _i64(page_ids))
        if self.abi.top_k is None:
            return DecodeOut(logits=out.to_host())
        values, indices = out
        return DecodeOut(top_values=values.to_host(), top_indices=indices.to_host())

    def read_cache(self) -> np.ndarray:
        """The KV pages this runner uses, copied to the host (tests)."""
        return self._fn("read_kv_cache")().to_host()[: self.page_count]


_DEVICES: dict[tuple[str, int], rt.HalDevice] = {}


def _device(driver: str, index: int) -> rt.HalDevice:
    """One device per (driver, index) for the life of the process, as iree.runtime's own cache does:
    destroying a device while its buffers are still referenced crashes at exit.
    local-task: every index is a CPU device of its own; hip/cuda: the index-th GPU."""
    key = (driver, index)
    if key not in _DEVICES:
        try:
            drv = rt.get_driver(driver)
            _DEVICES[key] = drv.create_default_device() if driver.startswith("local") else \
                drv.create_device_by_uri(f"{driver}://{index}")
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"cannot open IREE device {driver}:{index} ({e}); hint: --device local-task works "
                             "everywhere; hip/cuda need the GPU and a VMFB compiled for it") from e
    return _DEVICES[key]


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)
