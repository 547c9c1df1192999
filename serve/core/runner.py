"""The compiled program on IREE's runtime (torch-free): load a VMFB + parameter archives.

One `Runner` per device. It calls `prefill_bs{N}` / `decode_bs{N}` with numpy inputs; the KV cache is a
global of the program in this runner's VM context, updated in place by every call (it never comes back
to the host unless asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import iree.runtime as rt
import numpy as np

from models import cpu
from models.abi import ModelABI


@dataclass
class DecodeOut:
    """Full logits [B, V] (f32), or with on-device top-k: values/indices [B, K]."""

    logits: np.ndarray | None = None
    top_values: np.ndarray | None = None
    top_indices: np.ndarray | None = None


class Runner:
    """`device_ids`: one device, or with tensor parallelism the program's N devices (rank r on the r-th)."""

    def __init__(
        self,
        vmfb: Path,
        parameters: list[Path],
        abi: ModelABI,
        page_count: int | None = None,
        driver: str = "local-task",
        device_ids: list[int] | None = None,
    ):
        self.abi = abi
        device_ids = device_ids or list(range(abi.tensor_parallelism_size))
        if len(device_ids) != abi.tensor_parallelism_size:
            raise ValueError(
                f"the program runs on {abi.tensor_parallelism_size} devices (tensor parallelism); "
                f"{len(device_ids)} given: {device_ids}"
            )
        held = abi.paged_kv_cache.device_block_count
        self.page_count = page_count or held
        if not 2 <= self.page_count <= held:
            raise ValueError(
                f"{self.page_count} KV pages asked for; the program holds {held} (page 0 is the "
                f"padding page): use 2..{held}, or re-export with --device-block-count"
            )
        missing = [str(p) for p in parameters if not Path(p).is_file()]
        if missing:
            raise ValueError(f"parameter files not found: {missing}")
        if len(parameters) < len(abi.parameter_files):
            raise ValueError(
                f"the program needs the parameter files {abi.parameter_files}; {len(parameters)} given "
                "(hint: --parameters OUT/model.irpa OUT/model.rank*.irpa)"
            )
        if driver.startswith("local"):
            cpu.require(abi.cpu_features)
        self.instance = rt.VmInstance()
        self.devices = [_device(driver, i) for i in device_ids]
        self.device = self.devices[0]  # where the inputs go and the outputs come from
        index = rt.ParameterIndex()
        for p in parameters:
            index.load(str(p))
        params = rt.create_io_parameters_module(self.instance, index.create_provider(scope="model"))
        hal = rt.create_hal_module(self.instance, devices=self.devices)
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

    def prefill(
        self, tokens: np.ndarray, start_positions: np.ndarray, seq_lens: np.ndarray, page_ids: np.ndarray
    ) -> np.ndarray:
        """tokens [N, S] (any S: positions past a sequence's seq_len are padding) -> last-position logits [N, V]."""
        out = self._fn(f"prefill_bs{tokens.shape[0]}")(
            _i64(tokens), _i64(start_positions), _i64(seq_lens), _i64(page_ids)
        )
        return _host(out)

    def embed(
        self, tokens: np.ndarray, start_positions: np.ndarray, seq_lens: np.ndarray, page_ids: np.ndarray
    ) -> np.ndarray:
        """prefill that returns every position's final-normed hidden states [N, S, H] (f32)."""
        if not self.abi.has_embed:
            raise ValueError(
                "this export has no embed_bs{N} entry points; re-export it with this version "
                "of export.paged_llm to serve embeddings"
            )
        out = self._fn(f"embed_bs{tokens.shape[0]}")(
            _i64(tokens), _i64(start_positions), _i64(seq_lens), _i64(page_ids)
        )
        return _host(out).astype(np.float32, copy=False)

    def mixed(
        self,
        dec_tokens: np.ndarray,
        dec_seq_lens: np.ndarray,
        dec_page_ids: np.ndarray,
        tokens: np.ndarray,
        start_positions: np.ndarray,
        seq_lens: np.ndarray,
        page_ids: np.ndarray,
    ) -> np.ndarray:
        """decode (one token per row) and one prefill chunk (tokens [1, S]) in one call -> logits [Bd + 1, V]: the
        decode rows', then the chunk's last position's."""
        if not self.abi.has_mixed:
            raise ValueError("this export has no mixed entry point; re-export it with this version of export.paged_llm")
        out = self._fn("mixed")(
            _i64(dec_tokens).reshape(-1, 1),
            _i64(dec_seq_lens),
            _i64(dec_page_ids),
            _i64(tokens),
            _i64(start_positions),
            _i64(seq_lens),
            _i64(page_ids),
        )
        return _host(out)

    def score(
        self, tokens: np.ndarray, start_positions: np.ndarray, seq_lens: np.ndarray, page_ids: np.ndarray
    ) -> np.ndarray:
        """prefill that returns every position's logits [N, S, V]."""
        if not self.abi.has_score:
            raise ValueError("this export has no score entry point; re-export it with this version of export.paged_llm")
        return _host(self._fn("score")(_i64(tokens), _i64(start_positions), _i64(seq_lens), _i64(page_ids)))

    def decode(self, tokens: np.ndarray, seq_lens: np.ndarray, page_ids: np.ndarray) -> DecodeOut:
        """One token per sequence at position seq_lens - 1 (seq_len 0: an unused, padding slot)."""
        seq_lens = _i64(seq_lens)
        out = self._fn(f"decode_bs{tokens.shape[0]}")(
            _i64(tokens).reshape(-1, 1), seq_lens, seq_lens - 1, _i64(page_ids)
        )
        if self.abi.top_k is None:
            return DecodeOut(logits=_host(out))
        values, indices = out
        return DecodeOut(top_values=_host(values), top_indices=_host(indices))

    def read_cache(self, rank: int = 0) -> np.ndarray:
        """The KV pages this runner uses (with tensor parallelism: device `rank`'s slab), copied to the host."""
        return _host(self._fn("read_kv_cache" + (f"_{rank}" if rank else ""))())[: self.page_count]


_DEVICES: dict[tuple[str, int], rt.HalDevice] = {}


def set_cpu_threads(n: int) -> None:
    """Worker threads of the local-task devices opened from now on (IREE's task topology flag)."""
    if _DEVICES:
        raise ValueError("set the CPU threads before the first device is opened")
    rt.flags.parse_flags(f"--task_topology_max_group_count={n}")


def _device(driver: str, index: int) -> rt.HalDevice:
    """One device per (driver, index) for the life of the process, as iree.runtime's own cache does:
    destroying a device while its buffers are still referenced crashes at exit.
    local-task: every index is a CPU device of its own; hip/cuda: the index-th GPU."""
    key = (driver, index)
    if key not in _DEVICES:
        try:
            drv = rt.get_driver(driver)
            _DEVICES[key] = (
                drv.create_default_device()
                if driver.startswith("local")
                else drv.create_device_by_uri(f"{driver}://{index}")
            )
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"cannot open IREE device {driver}:{index} ({e}); hint: --device local-task works "
                "everywhere; hip/cuda need the GPU and a VMFB compiled for it"
            ) from e
    return _DEVICES[key]


def _host(a: rt.DeviceArray) -> np.ndarray:
    """A host copy: to_host() may map the device buffer, and a mapped result can be overwritten by later
    calls (a KV-cache read, after a call of another program)."""
    return np.array(a.to_host())


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)
