"""W8A8: int8 weights, int8 activations, int32 accumulation (`export.paged_llm --quantization w8a8`).

Every projection of the blocks and the output head becomes an `Int8Linear`: its weight is int8 with one
f32 scale per output row; at run time each token's input row is quantised to int8 with its own scale, the
product runs in integers (`torch._int_mm`, which IREE compiles to its i8 x i8 -> i32 matmul ukernel; with
`export --amx`, models.amx.AmxInt8Linear runs it on AMX tiles instead) and the two scales turn the int32 sums
back into floats. A decode step reads a quarter of the f32 bytes.

Per-token int8 activations lose accuracy where a few input channels carry outliers, so the inputs are
smoothed first (SmoothQuant, Xiao et al. 2023): channel j of the input is divided by
s_j = max|x_j|^a / max|W_j|^(1-a) and column j of the weight multiplied by it, which moves the outliers
into the weights, where int8 per row absorbs them. max|x_j| comes from running the float model over
`CALIBRATION_TEXT` at export. README "Export and compile by hand" has SmolLM2's perplexity.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SMOOTHING_ALPHA = 0.5
CALIBRATION_TEXT = (
    "The Amazon river carries more water than any other river on Earth. It rises in the Andes of Peru and "
    "flows east for about 6,400 kilometres before it reaches the Atlantic Ocean near the city of Belem. "
    "In 1905 Albert Einstein published four papers that changed physics: the photoelectric effect, Brownian "
    "motion, special relativity and the equivalence of mass and energy, E = mc^2.\n"
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])\n"
    "User: How do I bake a simple loaf of bread?\nAssistant: Mix 500 g of flour, 350 ml of warm water, 10 g "
    "of salt and 7 g of yeast. Knead for ten minutes, let it rise for an hour, shape it, let it rise again "
    "and bake at 220 C for 35 minutes.\n"
    "Quelle est la capitale de la France ? Paris est la capitale de la France. 東京は日本の首都です。"
)


def random_calibration_ids(vocab_size: int) -> list[int]:
    """The calibration input when no tokenizer comes with the weights: 256 seeded random token ids."""
    return torch.randint(0, vocab_size, (256,), generator=torch.Generator().manual_seed(0)).tolist()


_ROUND = 12582912.0  # 1.5 * 2**23


class Int8Linear(nn.Module):
    """y = x W^T (no bias) in W8A8; the parameters come from `quantize_linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features), requires_grad=False)
        self.input_scale = nn.Parameter(torch.ones(in_features), requires_grad=False)  # 1 / smoothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.to(torch.float32).reshape(-1, self.in_features) * self.input_scale.to(torch.float32)
        step = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        # round(v) as (v + 1.5 * 2**23) - 1.5 * 2**23: the same nearest-even rounding of an f32 below 2**22
        # (|v| <= 127 here), but IREE 3.13 expands torch.round (math.roundeven) into ~30 integer instructions
        # per vector, which would make quantising the activations a large part of a decode step
        # (README "IREE 3.13 findings").
        q = ((rows / step + _ROUND) - _ROUND).to(torch.int8)
        acc = self.int_matmul(q)
        y = acc.to(torch.float32) * step * self.weight_scale.to(torch.float32)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def int_matmul(self, q: torch.Tensor) -> torch.Tensor:
        """q [M, in] int8 -> q @ weight^T as [M, out] int32 (IREE's i8 x i8 -> i32 matmul ukernel)."""
        return torch._int_mm(q, self.weight.t())


def quantize_linear(
    weight: torch.Tensor, input_absmax: torch.Tensor, alpha: float = SMOOTHING_ALPHA
) -> dict[str, torch.Tensor]:
    """A float weight [out, in] and the calibration's max |input| per channel -> Int8Linear's parameters."""
    w = weight.to(torch.float32)
    smooth = input_absmax.clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
    w = w * smooth
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale, "input_scale": 1 / smooth}


@torch.no_grad()
def input_absmax(model: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """max |input| per channel of each named submodule of `model` while `run()` runs it."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, inputs):
            a = inputs[0].detach().to(torch.float32).reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            seen[name] = torch.maximum(seen[name], a) if name in seen else a

        return record

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen
