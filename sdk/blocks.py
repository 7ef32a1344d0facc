"""Weight blocks carried over from a GGUF file instead of being quantized a second time.

A student that arrives as GGUF Q4_0/Q4_1 is already 4-bit. Dequantizing and re-quantizing it for the
device stacks a second rounding on the first (measured on SmolLM2-135M: top-1 agreement with the
dequantized reference drops to ~62%). Both formats map exactly onto symmetric int4 codes with one scale
per block of 32 inputs, which is what XNNPACK's int4 kernels take, plus, for Q4_1, one float offset per
block:  Q4_0: w = d * (q - 8)       Q4_1: w = d * q + m = d * (q - 8) + (m + 8 d),  q in [0, 15].

The K-quant Q4_K (the bulk of a Q4_K_M file) is int4 per block of 32 too, inside super-blocks of 256 with 6-bit
sub-scales: w = (d * sc_j) * q - dmin * m_j, which is again scale * (q - 8) + offset per block of 32, exactly.

A "Q4_K_M" file is mostly *not* 4-bit: llama.cpp keeps sensitive tensors at Q6_K/Q8_0 and falls back to Q5_0
where a row is no multiple of 256 (Qwen2.5-Coder-0.5B: 133 Q5_0, 12 Q6_K, 13 Q8_0, 12 Q4_K tensors). Those
decode exactly into 8-bit codes (`Int8Blocks`): Q8_0 w = d * q; Q5_0 w = d * (q - 16); Q5_1 adds a min;
Q5_K is Q4_K's layout with a fifth bit (blocks of 32, offsets); Q6_K w = (d * sc_j) * (q - 32) per 16 values.
Backends that hold 8-bit blocks (ONNX Runtime's MatMulNBits) carry them as they are; re-rounding them to int4
cost the Qwen student 10 points of top-1 agreement (88.0% against its dequantized reference).
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

    def scaled(self, rows: torch.Tensor | None = None, column_blocks: torch.Tensor | None = None) -> "Int4Blocks":
        """The same codes for the weights times `rows` [rows] per row and `column_blocks` [cols // 32] per block
        of columns: only scales and offsets change, so nothing is rounded."""
        factor = torch.ones_like(self.scales)
        if rows is not None:
            factor = factor * rows.float()[:, None]
        if column_blocks is not None:
            factor = factor * column_blocks.float()[None, :]
        offsets = None if self.offsets is None else self.offsets * factor
        return Int4Blocks(self.codes, self.scales * factor, offsets)

    def map_rows(self, fn) -> "Int4Blocks":
        """Apply the same row reordering to codes, scales and offsets (e.g. llama.cpp's q/k permutation)."""
        return Int4Blocks(fn(self.codes), fn(self.scales), None if self.offsets is None else fn(self.offsets))


@dataclass
class Int8Blocks:
    """w[r, c] = scales[r, c // block] * codes[r, c] + offsets[r, c // block]  (offsets None: symmetric): GGUF's
    5-, 6- and 8-bit types as int8 codes, exactly."""

    codes: torch.Tensor  # int8 [rows, cols]
    scales: torch.Tensor  # float32 [rows, cols // block]
    offsets: torch.Tensor | None
    block: int = BLOCK  # 16 for Q6_K

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        w = self.codes.view(rows, cols // self.block, self.block).float() * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(rows, cols)

    def map_rows(self, fn) -> "Int8Blocks":
        return Int8Blocks(fn(self.codes), fn(self.scales), None if self.offsets is None else fn(self.offsets), self.block)

    @classmethod
    def of(cls, found: "Int4Blocks | Int8Blocks", block: int) -> "Int8Blocks":
        """Any carried blocks as 8-bit codes in blocks of `block` (which divides theirs): the same weights."""
        own = found.block if isinstance(found, Int8Blocks) else BLOCK
        repeat = own // block
        widen = (lambda t: t.repeat_interleave(repeat, dim=1)) if repeat > 1 else (lambda t: t)
        offsets = None if found.offsets is None else widen(found.offsets)
        return cls(found.codes.to(torch.int8), widen(found.scales), offsets, block)


CarriedBlocks = Int4Blocks | Int8Blocks
INT8_TYPES = {"Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}


def supports(type_name: str) -> bool:
    """Whether `decode` reads this GGUF type exactly (4-bit types as Int4Blocks, the others as Int8Blocks)."""
    return type_name in _LAYOUT or type_name == "Q4_K" or type_name in INT8_TYPES


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> CarriedBlocks:
    """raw: the tensor's bytes as GGUF stores them (row-major blocks); shape: (rows, cols) in torch order."""
    if type_name == "Q4_K":
        return _decode_q4_k(raw, shape)
    if type_name in INT8_TYPES:
        return _INT8_DECODERS[type_name](np.ascontiguousarray(raw, dtype=np.uint8), shape)
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


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    return raw[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _int8(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, shape: tuple[int, int], block: int) -> Int8Blocks:
    rows, cols = shape
    return Int8Blocks(
        torch.from_numpy(codes.astype(np.int8).reshape(rows, cols)),
        torch.from_numpy(scales.astype(np.float32).reshape(rows, cols // block)),
        None if offsets is None else torch.from_numpy(offsets.astype(np.float32).reshape(rows, cols // block)),
        block,
    )


def _decode_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> Int8Blocks:
    rows, cols = shape
    b = raw.reshape(rows, cols // BLOCK, 34)
    return _int8(b[..., 2:].view(np.int8), _f16(b, 0), None, shape, BLOCK)


def _five_bits(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: element j (< 16) is the low nibble of qs[j] plus bit j of qh; j + 16 the high nibble plus bit j + 16.
    `qh`: its 4 bytes (little-endian), unpacked bit by bit (12x faster than shifting a uint32 32 times)."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # [.., 32]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return (low | (high << 4)).astype(np.int16)


def _decode_q5(raw: np.ndarray, shape: tuple[int, int], has_min: bool) -> Int8Blocks:
    rows, cols = shape
    b = raw.reshape(rows, cols // BLOCK, 24 if has_min else 22)
    at = 4 if has_min else 2
    q = _five_bits(b[..., at + 4 :], b[..., at : at + 4]) - 16
    d = _f16(b, 0)
    offsets = _f16(b, 2) + 16.0 * d if has_min else None
    return _int8(q, d, offsets, shape, BLOCK)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (llama.cpp's get_scale_min_k4)."""
    packed = packed.astype(np.uint16)
    sc = np.empty(packed.shape[:-1] + (8,), np.float32)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 0x0F) | ((packed[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    return sc, mn


def _decode_q5_k(raw: np.ndarray, shape: tuple[int, int]) -> Int8Blocks:
    """176 bytes per 256: d, dmin, 12 bytes of scales/mins, qh[32], qs[128]. Sub-block 2i: low nibbles of
    qs[32i:32i+32] plus bit 2i of qh; sub-block 2i+1: their high nibbles plus bit 2i+1."""
    rows, cols = shape
    sb = raw.reshape(rows, cols // 256, 176)
    d, dmin = _f16(sb, 0), _f16(sb, 2)
    sc, mn = _k_scales(sb[..., 4:16])
    qh = sb[..., 16:48][..., None, :]  # [.., 1, 32]
    qs = sb[..., 48:].reshape(rows, cols // 256, 4, 32)
    bit = np.arange(8)[:, None]  # sub-block k takes bit k of qh
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, cols // 256, 8, 32).astype(np.int16)
    q = low | (((qh >> bit) & 1).astype(np.int16) << 4)  # [.., 8, 32]
    scales = d[..., None] * sc
    offsets = 16.0 * scales - dmin[..., None] * mn
    return _int8(q - 16, scales, offsets, shape, BLOCK)


def _decode_q6_k(raw: np.ndarray, shape: tuple[int, int]) -> Int8Blocks:
    """210 bytes per 256: ql[128], qh[64], int8 scales[16], d. Each half of 128: element l (< 32) of its four
    quarters is ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high nibble, with 2-bit pairs 0, 2, 4, 6 of qh[l]."""
    rows, cols = shape
    sb = raw.reshape(rows, cols // 256, 210)
    ql = sb[..., :128].reshape(rows, cols // 256, 2, 64)
    qh = sb[..., 128:192].reshape(rows, cols // 256, 2, 1, 32)
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
    high = (qh >> (2 * np.arange(4))[:, None]) & 3  # [.., 2, 4, 32]
    q = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    scales = _f16(sb, 208)[..., None] * sb[..., 192:208].view(np.int8).astype(np.float32)  # [.., 16]
    return _int8(q, scales, None, shape, 16)


_INT8_DECODERS = {
    "Q8_0": _decode_q8_0,
    "Q5_0": lambda raw, shape: _decode_q5(raw, shape, has_min=False),
    "Q5_1": lambda raw, shape: _decode_q5(raw, shape, has_min=True),
    "Q5_K": _decode_q5_k,
    "Q6_K": _decode_q6_k,
}


@dataclass
class TernaryBlocks:
    """w[r, c] = scales[r, c // block] * codes[r, c], codes in {-1, 0, 1}: BitNet b1.58 weights, exactly.

    Kept apart from `CarriedBlocks` (not in `gguf_blocks`): no int4/int8 exporter reads them; a ternary preset
    can carry them as they are. A Hugging Face checkpoint has one scale per matrix (block = cols, the same scale
    on every row: transformers' `weight_scale`); llama.cpp's TQ1_0/TQ2_0 one fp16 scale per 256 inputs."""

    codes: torch.Tensor  # int8 [rows, cols], values in {-1, 0, 1}
    scales: torch.Tensor  # float32 [rows, cols // block]
    block: int

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        w = self.codes.view(rows, cols // self.block, self.block).float() * self.scales[..., None]
        return w.reshape(rows, cols)

    def map_rows(self, fn) -> "TernaryBlocks":
        return TernaryBlocks(fn(self.codes), fn(self.scales), self.block)

    def scales_per(self, block: int) -> torch.Tensor:
        """The scales [rows, cols // block] for blocks of `block` inputs (which must divide `self.block`): each
        scale repeated over the smaller blocks it covers, so a backend with its own block size stores the same
        weights."""
        if self.block % block:
            raise ValueError(f"block {block} does not divide the ternary block {self.block}")
        return self.scales.repeat_interleave(self.block // block, dim=1)

    @classmethod
    def per_matrix(cls, codes: torch.Tensor, scale: float) -> "TernaryBlocks":
        """One scale for the whole matrix, as transformers' BitNet linears hold it."""
        rows, cols = codes.shape
        return cls(codes.to(torch.int8), torch.full((rows, 1), scale, dtype=torch.float32), cols)


TERNARY_TYPES = {"TQ1_0", "TQ2_0"}
TERNARY_BLOCK = 256  # QK_K


def decode_ternary(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> TernaryBlocks:
    """llama.cpp's TQ1_0 / TQ2_0 as codes and per-256 scales. gguf-py dequantizes (d * q, exact in float32); each
    block's fp16 d is its last two bytes (both layouts end with it), and q = value / d recovers the codes."""
    import gguf  # the GGUF reader's dependency, only needed for GGUF students

    rows, cols = shape
    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // TERNARY_BLOCK, -1)
    d = blocks[..., -2:].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, cols // 256]
    values = gguf.quants.dequantize(blocks.reshape(rows, -1), qtype).reshape(rows, cols // TERNARY_BLOCK, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(d[..., None] != 0, values / d[..., None], 0.0)
    return TernaryBlocks(torch.from_numpy(codes.astype(np.int8).reshape(rows, cols)), torch.from_numpy(d),
                         TERNARY_BLOCK)
