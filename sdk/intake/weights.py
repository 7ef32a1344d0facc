"""A student's weights, read from its file when asked for: the export never holds the whole checkpoint.

A 1.5B bf16 checkpoint is 6.2 GB in float32. Read eagerly, the export held that plus every copy made from it
(the module, the quantized tensors, the graph's initializers): 20 GB and a MemoryError for a 1.5B ONNX export.
Here each name maps to a reader of one tensor (safetensors and GGUF are memory-mapped), so a consumer that
converts tensor by tensor holds one float32 tensor at a time, and the page cache holds the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class LazyWeights(Mapping[str, T], Generic[T]):
    """name -> value, computed by its reader on every access and never cached (the caller keeps what it needs).

    Names and their order are fixed when the student is opened; reading a value may take a while (a
    dequantization), so iterate `.keys()` rather than `.items()` when only names or a few values are needed."""

    def __init__(self, readers: Mapping[str, Callable[[], T]]) -> None:
        self._readers = dict(readers)

    def __getitem__(self, name: str) -> T:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __contains__(self, name: object) -> bool:
        return name in self._readers

    def __repr__(self) -> str:
        return f"LazyWeights({len(self)} tensors)"
