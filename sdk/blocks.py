"""4-bit weight blocks carried over from a GGUF file instead of being quantized a second time.

A student that arrives as GGUF Q4_0/Q4_1 is already 4-bit. Dequantizing and re-quantizing it for the
device stacks a second rounding on the first (measured on SmolLM2-135M: top-1 agreement with the
dequantized reference drops to ~62%). Both formats map exactly onto symmetric int4 codes with one scale
per block of 32 inputs, which is what XNNPACK's int4 kernels take, plus, for Q4_1, one float offset per
block:  Q4_0: w = d * (q - 8)       Q4_1: w = d * q + m = d * (q - 8) + (m + 8 d),  q in [0, 15].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
_LAYOUT = {"Q4_0": (18, False), "Q4_1": (20, True)}  # bytes per block, has a min (offset)


@dataclass
class Int4Blocks:
    """w[r, c] = scales[r, c // 32] * codes[r, c] + offsets[r, c // 32]  (offsets None: symmetric)."""

    codes: torch.Tensor  # int8 [rows, cols], values in [-8, 7]
    scales: torch.Tensor  # float32 [rows, cols // 32]
    offsets: torch.Tensor | None  # float32 [rows, cols // 32]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        w = self.codes.view(rows, cols // BLOCK, BLOCK).float() * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(rows, cols)

    def with_positive_scales(self) -> "Int4Blocks":
        """The same weights with every scale >= 0, as XNNPACK requires (it rejects the program otherwise).

        Q4_0 stores a signed scale (d = extreme / -8). A block with d < 0 is rewritten exactly as
        w = |d| * (-q - 1) + |d|: codes stay in [-8, 7] and the block gains an offset of |d|.
        """
        negative = self.scales < 0
        if not bool(negative.any()):
            return self
        flip = negative.repeat_interleave(BLOCK, dim=1)
        codes = torch.where(flip, -self.codes - 1, self.codes).to(torch.int8)
        offsets = torch.zeros_like(self.scales) if self.offsets is None else self.offsets.clone()
        offsets = torch.where(negative, offsets - self.scales, offsets)
        return Int4Blocks(codes, self.scales.abs(), offsets)

    def map_rows(self, fn) -> "Int4Blocks":
        """Apply the same row reordering to codes, scales and offsets (e.g. llama.cpp's q/k permutation)."""
        return Int4Blocks(fn(self.codes), fn(self.scales), None if self.offsets is None else fn(self.offsets))


def supports(type_name: str) -> bool:
    return type_name in _LAYOUT


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Blocks:
    """raw: the tensor's bytes as GGUF stores them (row-major blocks); shape: (rows, cols) in torch order."""
    size, has_min = _LAYOUT[type_name]
    rows, cols = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:20] if has_min else blocks[..., 2:18]
    # Element j of a block sits in the low nibble of byte j, element j + 16 in its high nibble.
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int8) - 8
    offsets = None
    if has_min:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        offsets = torch.from_numpy(m + 8.0 * d)
    return Int4Blocks(torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d), offsets)
