"""4-bit weight blocks carried over from a GGUF file instead of being quantized a second time.

A student that arrives as GGUF Q4_0/Q4_1 is already 4-bit. Dequantizing and re-quantizing it for the
device stacks a second rounding on the first (measured on SmolLM2-135M: top-1 agreement with the
dequantized reference drops to ~62%). Both formats map exactly onto symmetric int4 codes with one scale
per block of 32 inputs, which is what XNNPACK's int4 kernels take, plus, for Q4_1, one float offset per
block:  Q4_0: w = d * (q - 8)       Q4_1: w = d * q + m = d * (q - 8) + (m + 8 d),  q in [0, 15].

The K-quant Q4_K (the bulk of a Q4_K_M file) is int4 per block of 32 too, inside super-blocks of 256 with 6-bit
sub-scales: w = (d * sc_j) * q - dmin * m_j, which is again scale * (q - 8) + offset per block of 32, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
_LAYOUT = {"Q4_0": (18, False), "Q4_1": (20, True)}  # bytes per block, has a min (offset)
Q4_K_BYTES, Q4_K_ELEMENTS = 144, 256  # per super-block: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 of codes


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
    return type_name in _LAYOUT or type_name == "Q4_K"


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Blocks:
    """raw: the tensor's bytes as GGUF stores them (row-major blocks); shape: (rows, cols) in torch order."""
    if type_name == "Q4_K":
        return _decode_q4_k(raw, shape)
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


def _decode_q4_k(raw: np.ndarray, shape: tuple[int, int]) -> Int4Blocks:
    """Q4_K super-blocks as blocks of 32 (llama.cpp's `dequantize_row_q4_K` layout): sub-block j of 8 has a 6-bit
    scale sc_j and min m_j; 64 elements share 32 bytes, the low nibbles holding sub-block 2g, the high 2g + 1."""
    rows, cols = shape
    sb = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // Q4_K_ELEMENTS, Q4_K_BYTES)
    d = sb[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = sb[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = sb[..., 4:16].astype(np.uint16)
    sc = np.empty(packed.shape[:-1] + (8,), np.float32)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    qs = sb[..., 16:].reshape(rows, cols // Q4_K_ELEMENTS, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, cols)  # sub-blocks in order 0..7
    scales = (d[..., None] * sc).reshape(rows, cols // BLOCK)
    offsets = (8.0 * scales - (dmin[..., None] * mn).reshape(rows, cols // BLOCK)).astype(np.float32)
    codes = (q.astype(np.int8) - 8).reshape(rows, cols)
    return Int4Blocks(torch.from_numpy(codes), torch.from_numpy(scales.astype(np.float32)), torch.from_numpy(offsets))
