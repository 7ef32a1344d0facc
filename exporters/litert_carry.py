"""GGUF int4 blocks carried into a LiteRT program exactly.

ai-edge-quantizer sets each block's scale from its absmax (absmax / 7), so it cannot reproduce a GGUF block that
uses code -8 (every Q4_1 block does: its minimum is code 0, i.e. -8 here) and rounds such weights again (SmolLM2's
Q4_1 linears re-rounded that way: perplexity x1.28 before any activation rounding). So the quantized program's
int4 codes and fp16 block scales are overwritten with the student's own: GGUF stores d in fp16, so the scales are
exact too. An asymmetric block (Q4_1's min, or a Q4_0 block with a negative scale made positive) keeps its offset
as a small matmul over the block sums, stored int8 per channel (ExecuTorch's `BlockOffsetLinear`, done in float).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgepack.blocks import BLOCK, Int4Blocks


class CarriedLinear(nn.Module):
    """y = x W^T + S(x) M^T (+ bias): W = the blocks' scales * codes (float, exact), S(x) the sums of each block of
    32 inputs, M the blocks' offsets (None: symmetric blocks, no second matmul). Names `main` and `offsets` are what
    the quantizer's recipe and `write_carried_blocks` find them by."""

    def __init__(self, linear: nn.Linear, blocks: Int4Blocks, round_offsets: Any) -> None:
        super().__init__()
        self.blocks = blocks
        self.main = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.main.weight.copy_(Int4Blocks(blocks.codes, blocks.scales, None).dequantize())
            if linear.bias is not None:
                self.main.bias.copy_(linear.bias)
        self.offsets = None
        if blocks.offsets is not None:
            self.offsets = nn.Linear(linear.in_features // BLOCK, linear.out_features, bias=False)
            with torch.no_grad():
                self.offsets.weight.copy_(round_offsets(blocks.offsets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(x)
        if self.offsets is None:
            return y
        sums = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK).sum(-1)
        return y + self.offsets(sums)


def carried_blocks_of(model: nn.Module) -> list[Int4Blocks]:
    return [m.blocks for m in model.modules() if isinstance(m, CarriedLinear)]


def write_carried_blocks(program: bytes, carried: list[Int4Blocks]) -> tuple[bytes, int]:
    """The quantized program with each carried matrix's int4 codes and fp16 scales written over the quantizer's
    (the matrix found as the closest of the same shape to what the quantizer stored). Returns the program and the
    count of matrices written."""
    from ai_edge_litert import schema_py_generated as schema

    data = bytearray(program)
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    raw = schema.Model.GetRootAs(data, 0)
    by_shape: dict[tuple[int, int], list[Int4Blocks]] = {}
    for blocks in carried:
        by_shape.setdefault(tuple(blocks.codes.shape), []).append(blocks)
    done: set[int] = set()
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            details = getattr(tensor.quantization, "details", None)
            if tensor.type != schema.TensorType.INT4 or not isinstance(details, schema.BlockwiseQuantizationT):
                continue
            shape = tuple(int(n) for n in tensor.shape)
            if tensor.buffer in done or details.blockSize != BLOCK or not by_shape.get(shape):
                continue
            codes_view = buffer_view(raw, data, tensor.buffer)
            scales_view = buffer_view(raw, data, graph.tensors[details.scales].buffer)
            rows = slice(0, 8)  # a few rows tell the matrices apart
            stored = unpack_int4(codes_view, shape)[rows] * _fp16(scales_view).reshape(shape[0], -1)[rows].repeat(
                BLOCK, axis=1)
            candidates = by_shape[shape]
            errors = [float(np.abs(stored - (b.codes[rows].float() * b.scales[rows].repeat_interleave(
                BLOCK, dim=1)).numpy()).max()) for b in candidates]
            best = candidates.pop(int(np.argmin(errors)))
            codes_view[:] = pack_int4(best.codes.numpy())
            scales_view[:] = best.scales.numpy().astype(np.float16).reshape(-1).view(np.uint8)
            done.add(tensor.buffer)
    return bytes(data), len(done)


def buffer_view(model: Any, data: bytearray, index: int) -> np.ndarray:
    """A writable view of buffer `index`'s bytes: inside the flatbuffer, or (large models: LiteRT writes constants
    after it) at the buffer's offset in the file."""
    buffer = model.Buffers(index)
    if buffer.Offset() > 1:
        return np.frombuffer(data, np.uint8, count=buffer.Size(), offset=buffer.Offset())
    return buffer.DataAsNumpy()


def _fp16(view: np.ndarray) -> np.ndarray:
    return view.view(np.float16).astype(np.float32)


def unpack_int4(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """LiteRT's int4 layout: two's-complement nibbles, the low nibble first, row-major."""
    low = (packed & 15).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    codes = np.stack([low, high], -1).reshape(-1)[: shape[0] * shape[1]]
    return np.where(codes > 7, codes - 16, codes).reshape(shape).astype(np.float32)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    nibbles = (codes.reshape(-1).astype(np.int16) & 15).astype(np.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)
