"""The Llama family in plain PyTorch, over a paged KV cache.

One forward serves prefill and decode: `tokens[b, i]` sits at position `start_positions[b] + i`; the
sequence is `seq_lens[b]` tokens long after this call, so positions >= seq_lens[b] are padding. Each
call writes its new K/V into the cache through the page table, then attends over the sequence's pages.

KV cache layout (one tensor, updated in place): `[page_count, page_elems]` with
`page_elems = num_layers * 2 * block_seq_stride * num_kv_heads * head_dim`, i.e. per page
`[layer][k|v][slot in page][kv head][head_dim]`. Page 0 is the padding page: writes of padded
positions and unused batch slots land there, and no sequence may own it. A bfloat16 or float16 cache is
stored as int32, two values a word (`PagedLlama.cache_dtype`; page_elems counts the words).

Rotary embeddings use GGUF's interleaved pair order (`models.weights` permutes HF Q/K rows to it).
No data-dependent Python control flow: this module is what `export.paged_llm` exports.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import paged_attention
from .config import LlamaConfig
from .page_gather import page_gather
from .qlinear import QLinear, quantized_input
from .quant import Int8Linear, input_absmax, quantize_linear
from .tp import shard_config
from .weights import ModelWeights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies, divided by the llama3 scaling factors when the model has them."""
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    if c.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(c.rope_freq_factors, dtype=torch.float32)
    return inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _f32(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * _to(h, x.dtype)


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast only when needed: a no-op cast still costs an op in every traced layer."""
    return t if t.dtype == dtype else t.to(dtype)


def _cat(ts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat, but one tensor is itself (no copy op in the traced graph)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _last(h: torch.Tensor, start_positions: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Each sequence's last position in this call: h [B, S, hidden] -> [B, hidden]."""
    last = torch.clamp(seq_lens - start_positions - 1, 0, h.shape[1] - 1)
    return torch.gather(h, 1, last.view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return _to(t, torch.float32)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, written so that IREE does not recognise it. IREE 3.13 raises
    torch.softmax, and max / exp / sum / divide, to its own softmax op, whose llvm-cpu dispatch over a
    dynamic dimension takes time quadratic in it: a 128-token prefill chunk at 4096 tokens of context spent
    ~90 % of its 11 s there. Multiplying by the sum's reciprocal keeps plain fused elementwise and reduction
    dispatches, linear in the context (0.48 s). docs/iree-findings.md."""
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e * torch.reciprocal(e.sum(-1, keepdim=True))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D] with rotary pairs interleaved; cos/sin: [B, S, 1, D/2].

    Both halves of each pair are computed for both slots and `where` picks one: all elementwise, so IREE
    fuses it into one dispatch. (torch.stack of the two halves would become 2 copies per tensor.)"""
    pairs = _f32(x).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0:1], pairs[..., 1:2]
    c, s = cos.unsqueeze(-1), sin.unsqueeze(-1)
    odd = torch.arange(2, device=x.device) == 1
    out = torch.where(odd, x0 * s + x1 * c, x0 * c - x1 * s)
    return _to(out.flatten(-2), x.dtype)


# W8A8 blocks: projections that read the same input are one Int8Linear over their stacked weights, so the
# input is smoothed and quantised once and one int8 matmul runs instead of three (two). Float blocks keep
# the GGUF's separate projections.
W8A8_FUSED = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "attn_output": ("attn_output",),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
}


def _linear(quantization: str, fmt: str | None = None):
    """The projection module: W8A8, a kept GGUF quantization in format `fmt` (models.qlinear), or float."""
    if quantization == "w8a8":
        return Int8Linear
    if fmt:
        return lambda i, o: QLinear(i, o, fmt)
    return lambda i, o: nn.Linear(i, o, bias=False)


def _project(lin: nn.Module, h: torch.Tensor, quantized) -> torch.Tensor:
    return lin(h, quantized) if isinstance(lin, QLinear) else lin(h)


class Block(nn.Module):
    def __init__(
        self,
        c: LlamaConfig,
        quantization: str = "none",
        kv_dtype: torch.dtype = torch.float32,
        kept: dict[str, str] | None = None,
    ):
        """kept (quantization "gguf"): projection name (attn_q, ...) -> the format of its kept GGUF weight
        (models.gguf_quant.FORMATS); projections not named stay float."""
        super().__init__()
        self.c = c
        self.kv_dtype = kv_dtype  # the cached K/V values' type (a 16-bit one is stored in int32 words)
        self.cpu_attention: str | None = None  # the kernel's ISA: models.paged_attention.enable
        kept = kept or {}
        self.fused = quantization == "w8a8"

        def linear(name: str, i: int, o: int) -> nn.Module:
            return _linear(quantization, kept.get(name))(i, o)

        self.qkv_split = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if self.fused:  # (see W8A8_FUSED)
            self.attn_qkv = linear("attn_qkv", c.hidden_size, sum(self.qkv_split))
            self.ffn_gate_up = linear("ffn_gate_up", c.hidden_size, 2 * c.intermediate_size)
        else:
            self.attn_q, self.attn_k, self.attn_v = (
                linear(name, c.hidden_size, n) for name, n in zip(("attn_q", "attn_k", "attn_v"), self.qkv_split)
            )
            self.ffn_gate = linear("ffn_gate", c.hidden_size, c.intermediate_size)
            self.ffn_up = linear("ffn_up", c.hidden_size, c.intermediate_size)
        self.attn_output = linear("attn_output", c.num_heads * c.head_dim, c.hidden_size)
        self.ffn_down = linear("ffn_down", c.intermediate_size, c.hidden_size)

    def attention(self, x, layer: int, cache, lays: list[tuple]):
        """-> (the attention sublayer's output (before the residual add), the cache with this call's K/V).
        With a head-sharded config (models.tp.shard_config) this is one rank's partial sum.

        `lays`: one layout (PagedLlama._layout) per group of sequences. One group: x is [B, S, hidden]. Several
        (a mixed step): x is [1, N, hidden], the groups' rows one after another, each group's [B, S] rows
        flattened; the projections run once over all N rows and attention per group over its own pages."""
        c = self.c
        h = self.attn_norm(x)
        if self.fused:
            q, k, v = self.attn_qkv(h).split(self.qkv_split, -1)
        else:
            hq = quantized_input(h, self.attn_q, self.attn_k, self.attn_v)
            q, k, v = (_project(p, h, hq) for p in (self.attn_q, self.attn_k, self.attn_v))
        shapes = [tuple(x.shape[:2])] if len(lays) == 1 else [tuple(lay[2].shape) for lay in lays]
        groups, at = [], 0
        for (B, S), (cos, sin, *_) in zip(shapes, lays):
            qg, kg, vg = (q, k, v) if len(lays) == 1 else (t[:, at : at + B * S] for t in (q, k, v))
            at = at + B * S
            groups.append(
                (
                    apply_rope(qg.reshape(B, S, c.num_heads, c.head_dim), cos, sin),
                    apply_rope(kg.reshape(B, S, c.num_kv_heads, c.head_dim), cos, sin),
                    vg.reshape(B, S, c.num_kv_heads, c.head_dim),
                )
            )

        # Write this call's K and V through the page table, then read the whole context back.
        # A bfloat16 or float16 cache is stored as int32 words of two values (PagedLlama.cache_dtype): the
        # scatter writes words (IREE 3.13 miscompiled programs with a 16-bit cache global: README
        # findings), the gathers read 16-bit pages through a bitcast view of it.
        packed, kv_width, stride = self._cache_geometry(cache)
        # (Explicit B * S rows, not -1: both scatter operands must fold to the same static shape. The row
        #  width as -1, and the rows reshaped before any cast or bitcast: with an explicit width, or packed
        #  with integer ops before the reshape, IREE 3.13 scattered a dynamic-batch prefill's bfloat16 rows
        #  wrongly (tests/test_export.py bfloat16 test). Two scatters: IREE 3.13 miscompiled one scatter of
        #  the concatenated K and V rows. All groups' rows go in the same two scatters.)
        k_rows = _cat([lay[2].reshape(B * S) for (B, S), lay in zip(shapes, lays)]) + (2 * layer) * stride
        shape = cache.shape
        k_new, v_new = (
            _cat([_to(g[i].reshape(B * S, -1), self.kv_dtype) for (B, S), g in zip(shapes, groups)]) for i in (1, 2)
        )
        if packed:
            k_new, v_new = k_new.view(torch.int32), v_new.view(torch.int32)
        cache = cache.view(-1, kv_width).index_put((k_rows,), k_new)
        cache = cache.index_put((k_rows + stride,), v_new).view(shape)
        outs = [self._attend(g[0], layer, cache, lay, x.dtype) for g, lay in zip(groups, lays)]
        attn = outs[0] if len(outs) == 1 else torch.cat([o.reshape(1, -1, o.shape[-1]) for o in outs], 1)
        return self.attn_output(attn), cache

    def _cache_geometry(self, cache) -> tuple[bool, int, int]:
        """(whether the cache is int32 words of two 16-bit values, cache elements a K or V row, the page size:
        static)."""
        c = self.c
        packed = cache.dtype == torch.int32
        kv_width = c.num_kv_heads * c.head_dim // (2 if packed else 1)
        return packed, kv_width, cache.shape[1] // (c.num_layers * 2 * kv_width)

    def _attend(self, q, layer: int, cache, lay: tuple, dtype: torch.dtype):
        """One group's attention output [B, S, heads * head_dim] in `dtype`: queries q [B, S, H, D] (roped)
        over the pages of each sequence, this call's K/V already written."""
        c = self.c
        B, S = q.shape[:2]
        _, _, _, read_pages, mask, last_visible = lay
        packed, kv_width, stride = self._cache_geometry(cache)
        k_pages = read_pages + 2 * layer
        if self.cpu_attention:  # (models.paged_attention: reads the pages where they are)
            rows = cache.view(-1, stride * kv_width)
            attn = paged_attention.attend(q, rows, k_pages, last_visible, c, self.kv_dtype, self.cpu_attention)
            return _to(attn.reshape(B, S, c.num_heads * c.head_dim), dtype)
        # Whole pages as rows of a 2-D view (models.page_gather: contiguous row copies; in the full model
        # they stay dispatches of their own). With a unit head dimension in the probs x V sum (one KV head;
        # or one query head a KV head at batch 1) IREE 3.13 fails to compile the V gather, or a 16-bit
        # cache's widening, fused into that sum ("'affine.delinearize_index' op no basis element may be
        # statically non-positive"): then V is gathered in a dispatch of its own, and from a 16-bit cache
        # widened to f32 first and copied into a dispatch of its own by an identity gather.
        cache_pages = cache.view(-1, stride * kv_width)
        if packed:
            cache_pages = cache_pages.view(self.kv_dtype)
        unit_heads = c.num_kv_heads == 1 or (c.num_heads == c.num_kv_heads and B == 1)
        keys = page_gather(cache_pages, k_pages, 0)
        vals = page_gather(cache_pages, k_pages + 1, int(c.num_kv_heads == 1 and not packed))
        if unit_heads and packed:
            rows = _f32(vals).flatten(0, 1)
            vals = page_gather(rows, torch.arange(rows.shape[0], device=rows.device), 1)
        keys, vals = (t.view(B, -1, c.num_kv_heads, c.head_dim) for t in (keys, vals))

        # GQA without materialising repeated KV heads: group the query heads of each KV head.
        KV, D, rep = c.num_kv_heads, c.head_dim, c.num_heads // c.num_kv_heads
        T = keys.shape[1]
        if isinstance(S, int) and S == 1:
            # A one-token step (export.paged_llm's static decode traces): products summed over the
            # gathered pages, no transposes or bmm; IREE makes each a single dispatch. (IREE 3.13 failed
            # to compile the probs x V bmm at some static batches: "'affine.delinearize_index' op no basis
            # element may be statically non-positive" at B * KV = 16 or 48.)
            qh = _f32(q).view(B, KV, rep, 1, D)
            scores = (qh * _f32(keys).permute(0, 2, 1, 3).unsqueeze(2)).sum(-1).unsqueeze(3) * (D**-0.5)
            if isinstance(B, int):
                scores = scores.masked_fill(mask, torch.finfo(torch.float32).min)
            else:
                # A dynamic batch (the mixed step's decode rows): with an i1 mask in this dispatch IREE 3.13's
                # data tiling fails to compile (MQA: "'linalg.pack' op expected padding_value has 'i8' but got:
                # 'i1'"). An additive bias from integer arithmetic has no i1: 0 where visible, -1e30 past it.
                past = torch.clamp(torch.arange(T).view(1, -1) - last_visible.view(-1, 1), 0, 1)
                scores = scores + (past.float() * -1e30).view(B, 1, 1, 1, T)
            probs = _softmax(scores).view(B, KV, rep, T, 1)
            attn = (probs * _f32(vals).permute(0, 2, 1, 3).unsqueeze(2)).sum(3).view(B, KV, rep, 1, D)
            if not self.fused and (not isinstance(B, int) or B > 1):
                # With data tiling IREE 3.13 fuses the output projection's input packing (set_encoding)
                # into this sum, which then runs many times slower. An identity gather of the rows keeps
                # them apart. (W8A8 quantises the input first: no such fusion.)
                attn = page_gather(attn.reshape(B, -1), torch.arange(B), 0).view(B, KV, rep, 1, D)
        else:
            # (3-D bmm over B*KV: IREE's data tiling rejects 5-D broadcasting and some 4-D batch matmuls.)
            qg = _f32(q).view(B, S, KV, rep, D).permute(0, 2, 3, 1, 4).reshape(B * KV, rep * S, D)
            kg = _f32(keys).permute(0, 2, 3, 1).reshape(B * KV, D, T)
            vg = _f32(vals).permute(0, 2, 1, 3).reshape(B * KV, T, D)
            scores = torch.bmm(qg, kg).view(B, KV, rep, S, T) * (D**-0.5)
            scores = scores.masked_fill(mask, torch.finfo(torch.float32).min)
            probs = _softmax(scores).view(B * KV, rep * S, T)
            attn = torch.bmm(probs, vg).view(B, KV, rep, S, D)
        return _to(attn.permute(0, 3, 1, 2, 4).reshape(B, S, c.num_heads * D), dtype)

    def feed_forward(self, x):
        """The FFN sublayer's output (before the residual add); a rank's partial sum when sharded."""
        h = self.ffn_norm(x)
        if self.fused:
            gate, up = self.ffn_gate_up(h).chunk(2, -1)
        else:
            hq = quantized_input(h, self.ffn_gate, self.ffn_up)
            gate, up = _project(self.ffn_gate, h, hq), _project(self.ffn_up, h, hq)
        return self.ffn_down(F.silu(gate) * up)


def _layer_kept(kept: dict[str, str], layer: int) -> dict[str, str]:
    """GGUF names of layer `layer`'s kept tensors -> projection names (blk.3.attn_q.weight -> attn_q)."""
    prefix = f"blk.{layer}."
    return {k[len(prefix) :].removesuffix(".weight"): v for k, v in kept.items() if k.startswith(prefix)}


class Rank(nn.Module):
    """One tensor-parallel rank's slices of every block (see models.tp)."""

    def __init__(self, c: LlamaConfig, kv_dtype: torch.dtype):
        super().__init__()
        self.blk = nn.ModuleList(Block(c, kv_dtype=kv_dtype) for _ in range(c.num_layers))


class PagedLlama(nn.Module):
    """tp > 1: Megatron-style tensor parallelism over `tp` IREE devices (models.tp): rank r's block slices
    and KV-cache slab live on device r; the embedding, final norm and head on device 0.
    quantization "w8a8": every projection and the head are models.quant.Int8Linear (the head then has its
    own int8 copy of a tied embedding table); made from a float model by `quantize_w8a8`.
    quantization "gguf": the matrices named in `kept` (GGUF tensor name -> format) are models.qlinear.QLinear
    over the GGUF's own quantization (a kept token_embd serves as the tied head too); the rest are float."""

    def __init__(
        self,
        config: LlamaConfig,
        block_seq_stride: int = 16,
        dtype=torch.float32,
        kv_dtype=None,
        tp: int = 1,
        quantization: str = "none",
        kept: dict[str, str] | None = None,
    ):
        super().__init__()
        self.config = c = config
        kept = kept or {}
        self.block_seq_stride = block_seq_stride
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.tp = tp
        self.quantization = quantization
        embd = kept.get("token_embd.weight")
        self.token_embd = (
            QLinear(c.hidden_size, c.vocab_size, embd) if embd else nn.Embedding(c.vocab_size, c.hidden_size)
        )
        if tp == 1:
            self.blk = nn.ModuleList(
                Block(c, quantization, self.kv_dtype, _layer_kept(kept, i)) for i in range(c.num_layers)
            )
        else:
            self.rank = nn.ModuleList(Rank(shard_config(c, tp), self.kv_dtype) for _ in range(tp))
        self.output_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        tied = c.tied_embeddings and quantization != "w8a8"
        self.output = None if tied else _linear(quantization, kept.get("output.weight"))(c.hidden_size, c.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)
        self.to(dtype)
        for mod in self.modules():  # (.to cast the kept scales too: they stay float16)
            if isinstance(mod, QLinear):
                mod.scales.data = mod.scales.data.to(torch.float16)

    @property
    def page_elems(self) -> int:
        """Elements of one KV page on one device (each device holds num_kv_heads / tp heads)."""
        c = self.config
        values = c.num_layers * 2 * self.block_seq_stride * (c.num_kv_heads // self.tp) * c.head_dim
        return values // 2 if self.cache_dtype == torch.int32 else values

    @property
    def cache_dtype(self) -> torch.dtype:
        """The cache tensor's element type: a 16-bit cache is int32 words of two values (see attention)."""
        return torch.int32 if self.kv_dtype in (torch.bfloat16, torch.float16) else self.kv_dtype

    def allocate_cache(self, page_count: int) -> torch.Tensor | list[torch.Tensor]:
        """The KV cache: one tensor, or with tp > 1 one slab per device."""
        caches = [torch.zeros(page_count, self.page_elems, dtype=self.cache_dtype) for _ in range(self.tp)]
        return caches[0] if self.tp == 1 else caches

    @classmethod
    def from_weights(
        cls, weights: ModelWeights, block_seq_stride: int = 16, dtype=torch.float32, kv_dtype=None, tp: int = 1
    ):
        """From unsharded weights, or tensor-parallel ones (sharding.shard_tensors) when tp > 1."""
        with torch.device("meta"):
            model = cls(weights.config, block_seq_stride, dtype, kv_dtype, tp)
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(dtype) for k, v in weights.tensors.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(weights.config)
        return model.eval()

    @classmethod
    def from_parameters(cls, weights: ModelWeights, block_seq_stride: int = 16, dtype=torch.float32, kv_dtype=None):
        """From an exported program's parameters as they are (read_irpa of its model.irpa), kept GGUF
        quantizations included: the eager twin of the program (tp = 1, not W8A8)."""
        expected = weights.expected_shapes()
        kept = {}
        for name, (_, cols) in ((n, s) for n, s in expected.items() if len(s) == 2):
            scales = weights.tensors.get(name.removesuffix(".weight") + ".scales")
            if scales is not None:  # (the packed shapes tell the format: bits, and whether m is stored)
                bits = weights.tensors[name].shape[1] * 8 // cols
                kept[name] = f"q{bits}" + ("m" if scales.shape[1] == cols else "")
        with torch.device("meta"):
            model = cls(weights.config, block_seq_stride, dtype, kv_dtype, 1, "gguf" if kept else "none", kept)
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.tensors.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(weights.config)
        return model.eval()

    @classmethod
    def uninitialized(
        cls,
        config: LlamaConfig,
        block_seq_stride: int = 16,
        dtype=torch.float32,
        kv_dtype=None,
        tp: int = 1,
        quantization: str = "none",
        kept: dict[str, str] | None = None,
    ):
        """Right shapes, garbage values, no initialisation cost: what export traces."""
        with torch.device("meta"):
            model = cls(config, block_seq_stride, dtype, kv_dtype, tp, quantization, kept)
        model = model.to_empty(device="cpu")
        model.inv_freq = rope_inv_freq(config)
        return model.eval()

    @torch.no_grad()
    def quantize_w8a8(self, calibration_ids: list[int]) -> PagedLlama:
        """This float (tp = 1) model in W8A8 (models.quant), smoothed with its own activations on
        `calibration_ids` (one prompt)."""
        c, stride = self.config, self.block_seq_stride
        fused = {
            f"blk.{i}.{f}": [f"blk.{i}.{p}" for p in parts]
            for i in range(c.num_layers)
            for f, parts in W8A8_FUSED.items()
        }
        count = len(calibration_ids)
        pages = -(-count // stride)
        hidden = []
        # (the projections of one fused group read the same input: the first one's is recorded)
        absmax = input_absmax(
            self,
            [parts[0] for parts in fused.values()],
            lambda: hidden.append(
                self.hidden_states(
                    torch.tensor([calibration_ids]),
                    torch.tensor([0]),
                    torch.tensor([count]),
                    torch.arange(1, pages + 1).view(1, -1),
                    self.allocate_cache(pages + 1),
                )
            ),
        )
        with torch.device("meta"):
            model = PagedLlama(c, stride, self.dtype, self.kv_dtype, 1, "w8a8")
        replaced = {p for parts in fused.values() for p in parts} | {"output"}
        state = {k: v for k, v in self.state_dict().items() if k.rsplit(".", 1)[0] not in replaced}
        head = self.token_embd.weight if self.output is None else self.output.weight
        inputs = {"output": (head, hidden[0][0].abs().amax(0))}
        for name, parts in fused.items():
            inputs[name] = (torch.cat([self.get_submodule(p).weight for p in parts]), absmax[parts[0]])
        for name, (w, amax) in inputs.items():
            state.update({f"{name}.{k}": v for k, v in quantize_linear(w, amax).items()})
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = self.inv_freq
        return model.eval()

    def forward(self, tokens, start_positions, seq_lens, page_ids, *caches):
        """-> (logits [B, V] of each sequence's last position in this call, final-normed hidden states
        [B, S, hidden] of every position (embeddings), the updated cache (tp > 1: each device's slab)).

        Functional (the cache is threaded through the blocks and returned); the exported entry points
        store the new cache in the program's KV-cache global(s) and return the output they need.
        """
        h, caches = self._blocks([(tokens, start_positions, seq_lens, page_ids)], list(caches))
        return self.logits(_last(h, start_positions, seq_lens)), h, *caches

    def forward_mixed(
        self, dec_tokens, dec_seq_lens, dec_page_ids, tokens, start_positions, seq_lens, page_ids, *caches
    ):
        """One step of decode and prefill together: dec_tokens [Bd, 1] at positions dec_seq_lens - 1, and the
        chunks tokens [Bp, S] as `forward` takes them (the exported program: Bp = 1, export.paged_llm). ->
        (logits [Bd + Bp, V]: each decode token's, then each chunk's last position's, the updated cache(s)).

        The weight layers run once over the Bd + Bp * S rows; attention runs per group (decode's one-token
        path, prefill's chunk path), so a prefill chunk no longer stops the decoding sequences for a call
        of its own."""
        groups = [
            (dec_tokens, dec_seq_lens - 1, dec_seq_lens, dec_page_ids),
            (tokens, start_positions, seq_lens, page_ids),
        ]
        h, caches = self._blocks(groups, list(caches))
        rows = dec_tokens.shape[0]
        h_dec = h[0, :rows]
        h_pre = h[0, rows:].reshape(tokens.shape[0], tokens.shape[1], -1)
        return self.logits(torch.cat([h_dec, _last(h_pre, start_positions, seq_lens)])), *caches

    def forward_score(self, tokens, start_positions, seq_lens, page_ids, *caches):
        """`forward` returning every position's logits [B, S, V] (speculative verification, prompt
        logprobs), and the updated cache(s)."""
        h, caches = self._blocks([(tokens, start_positions, seq_lens, page_ids)], list(caches))
        return self.logits(h), *caches

    def _blocks(self, groups: list[tuple], caches: list):
        """-> (final-normed hidden states, the updated caches). `groups`: (tokens [B, S], start_positions,
        seq_lens, page_ids) each; one group gives [B, S, hidden], several [1, N, hidden]: every group's
        rows, flattened, one group after another (Block.attention).

        With tp > 1 every rank keeps a replica of the residual stream on its device; each sublayer's
        partial outputs are all-reduced (models.tp.all_reduce) before the residual add."""
        tokens = _cat([g[0].reshape(1, -1) for g in groups], 1) if len(groups) > 1 else groups[0][0]
        if isinstance(self.token_embd, QLinear):
            x = _to(self.token_embd.lookup(tokens), self.dtype)
        else:
            x = self.token_embd(tokens)
        if self.tp == 1:
            ranks, lays, xs = [self], [[self._layout(*g) for g in groups]], [x]
        else:
            from .tp import all_reduce, to_device

            ranks = list(self.rank)
            # Each device derives the layout from its own copy of the inputs: IREE 3.13 mis-sized the
            # transfer of a derived index tensor (only its first row arrived).
            lays = [[self._layout(*[to_device(r, t) for t in g]) for g in groups] for r in range(self.tp)]
            xs = [to_device(r, x) for r in range(self.tp)]
        for i in range(self.config.num_layers):
            parts = []
            for r, rank in enumerate(ranks):
                out, caches[r] = rank.blk[i].attention(xs[r], i, caches[r], lays[r])
                parts.append(out)
            xs = [x + p for x, p in zip(xs, parts if self.tp == 1 else all_reduce(parts))]
            parts = [rank.blk[i].feed_forward(x) for rank, x in zip(ranks, xs)]
            xs = [x + p for x, p in zip(xs, parts if self.tp == 1 else all_reduce(parts))]
        return self.output_norm(xs[0]), caches

    def _layout(self, tokens, start_positions, seq_lens, page_ids):
        """What every layer shares: rope (cos, sin), then (write_rows, read_pages, mask, last_visible: the last
        key position each query sees, -1 for none)."""
        c = self.config
        B, S = tokens.shape
        stride = self.block_seq_stride
        pos = start_positions.unsqueeze(1) + torch.arange(S, dtype=start_positions.dtype).unsqueeze(0)
        valid = pos < seq_lens.unsqueeze(1)

        freqs = pos.float().unsqueeze(-1) * self.inv_freq  # [B, S, D/2]
        cos, sin = freqs.cos().unsqueeze(2), freqs.sin().unsqueeze(2)

        # Flat row of each new token's K in layer 0; padding positions go to page 0.
        P = page_ids.shape[1]
        # (Positions are clamped to >= 0 first: decode's padding slots sit at position -1.)
        safe_pos = torch.clamp(pos, min=0)
        slot = torch.clamp(torch.div(safe_pos, stride, rounding_mode="floor"), max=P - 1)
        page = torch.where(valid, torch.gather(page_ids, 1, slot), torch.zeros_like(slot))
        write_rows = (page * (c.num_layers * 2)) * stride + safe_pos.remainder(stride)
        read_pages = page_ids * (c.num_layers * 2)  # [B, P]: (page, layer 0, K) in rows of stride * KV * D

        # Query at `pos` sees keys at positions <= min(pos, seq_len - 1).
        last_visible = torch.minimum(pos, seq_lens.unsqueeze(1) - 1)
        key_pos = torch.arange(P * stride, dtype=pos.dtype)
        mask = (key_pos.view(1, 1, -1) > last_visible.unsqueeze(-1)).view(B, 1, 1, S, P * stride)
        return cos, sin, write_rows, read_pages, mask, last_visible

    # Eager entry points with the exported programs' in-place cache semantics (`cache`: a tensor, or with
    # tp > 1 the list of slabs from allocate_cache).
    def _run(self, fn, inputs: tuple, cache):
        """fn(*inputs, *caches) -> (*outputs, *new caches); copies the new caches into `cache`."""
        caches = cache if isinstance(cache, list) else [cache]
        out = list(fn(*inputs, *caches))
        for c, n in zip(caches, out[len(out) - len(caches) :]):
            c.copy_(n)
        return out[: len(out) - len(caches)]

    def hidden_states(self, tokens, start_positions, seq_lens, page_ids, cache) -> torch.Tensor:
        """Final-normed hidden states [B, S, hidden] of every position (updates `cache`)."""
        return self._run(self.forward, (tokens, start_positions, seq_lens, page_ids), cache)[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            return _f32(self.output(h))
        if isinstance(self.token_embd, QLinear):  # (a kept table is a linear layer's weight already)
            return _f32(self.token_embd(h))
        return _f32(F.linear(h, self.token_embd.weight))

    def prefill(self, tokens, start_positions, seq_lens, page_ids, cache) -> torch.Tensor:
        """Logits [B, vocab] of each sequence's last position in this chunk (updates `cache`)."""
        return self._run(self.forward, (tokens, start_positions, seq_lens, page_ids), cache)[0]

    def decode(self, tokens, seq_lens, page_ids, cache) -> torch.Tensor:
        """One new token per sequence (at position seq_lens - 1): logits [B, vocab] (updates `cache`)."""
        return self.prefill(tokens, seq_lens - 1, seq_lens, page_ids, cache)

    def score(self, tokens, start_positions, seq_lens, page_ids, cache) -> torch.Tensor:
        """prefill returning every position's logits [B, S, vocab] (updates `cache`)."""
        return self._run(self.forward_score, (tokens, start_positions, seq_lens, page_ids), cache)[0]

    def mixed(self, dec_tokens, dec_seq_lens, dec_page_ids, tokens, start_positions, seq_lens, page_ids, cache):
        """decode and prefill in one call (forward_mixed): logits [Bd + Bp, vocab] (updates `cache`)."""
        inputs = (dec_tokens, dec_seq_lens, dec_page_ids, tokens, start_positions, seq_lens, page_ids)
        return self._run(self.forward_mixed, inputs, cache)[0]
