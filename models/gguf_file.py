"""Reading a GGUF file: its architecture, and each tensor's type, true shape and packed bytes.

The container is parsed by the `gguf` package (llama.cpp's own reader); this module turns what it
reports into what a torch loader needs, and turns its failures into errors a user can act on:
a file that is not GGUF, one cut short by a download, a tensor type we cannot dequantize.

Conventions of the files people have (llama.cpp's and ComfyUI-GGUF's converters):
- shapes are stored innermost-first (ggml order); we report torch order;
- tensors of more than four dimensions (a Conv3d weight) are stored flattened, with their real
  shape under the metadata key `comfy.gguf.orig_shape.<tensor name>`;
- `general.architecture` names the model family ("wan", "t5", "t5encoder", ...).

Tensor bytes are memory-mapped by the reader and copied out one tensor at a time, so loading never
holds a second copy of the file; the mapped pages are clean file pages the OS can drop.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.gguf_dequant import QuantType, UnsupportedQuantError, dequantize, quant_type
from .checkpoint import CheckpointError

GGUF_EXTS = (".gguf",)
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def is_gguf(path: str) -> bool:
    """True for a .gguf file name (what the loaders branch on before opening anything)."""
    return path.lower().endswith(GGUF_EXTS)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, ggml type, torch-order shape and (mapped) bytes."""

    name: str
    qtype: QuantType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def quantized(self) -> bool:
        return self.qtype.decode is not None

    def packed(self) -> torch.Tensor:
        """The stored bytes copied into a fresh uint8 tensor [rows, bytes per row] (rows = all but
        the last dimension), which is how a dequantizing layer keeps its weight."""
        row = self.shape[-1] if self.shape else 1
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        flat = torch.from_numpy(np.array(self.data, copy=True).reshape(-1).view(np.uint8))
        return flat.reshape(rows, self.qtype.row_bytes(row))

    def to_float(self, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantized (or cast) to `dtype` in torch order."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(self.data.reshape(-1).view(np.uint8))
        return dequantize(raw, self.qtype, self.shape, dtype)


class GGUFFile:
    """A parsed GGUF file. `tensors` maps each tensor's name to its `GGUFTensor`, in file order."""

    def __init__(self, path: str):
        self.path = path
        try:
            import gguf
        except ImportError as exc:  # a declared dependency; say so if the install skipped it
            raise CheckpointError("Reading .gguf files needs the 'gguf' package: pip install gguf") from exc
        self._gguf = gguf
        self._reader = _open_reader(gguf, path)
        self.architecture = self.string_field("general.architecture")
        self.tensors: dict[str, GGUFTensor] = {}
        for tensor in self._reader.tensors:
            self.tensors[tensor.name] = self._tensor(tensor)

    def _tensor(self, tensor) -> GGUFTensor:
        type_id = int(tensor.tensor_type)
        try:
            qtype = quant_type(type_id, getattr(tensor.tensor_type, "name", None))
        except UnsupportedQuantError as exc:
            raise CheckpointError(f"{self.path}: tensor '{tensor.name}': {exc}") from None
        shape = self._orig_shape(tensor.name) or tuple(int(s) for s in reversed(tensor.shape))
        if int(np.prod(shape)) != int(tensor.n_elements):
            raise CheckpointError(f"{self.path}: tensor '{tensor.name}' holds {int(tensor.n_elements)} values but "
                                  f"its recorded shape {shape} needs {int(np.prod(shape))}. The file is damaged.")
        return GGUFTensor(tensor.name, qtype, shape, tensor.data)

    def _orig_shape(self, name: str) -> tuple[int, ...] | None:
        field = self._reader.get_field(ORIG_SHAPE_KEY + name)
        if field is None:
            return None
        values = field.contents()
        if not isinstance(values, list) or not all(isinstance(v, int) for v in values):
            raise CheckpointError(f"{self.path}: metadata '{ORIG_SHAPE_KEY + name}' should be a list of "
                                  f"integers, got {values!r}. The file is damaged.")
        return tuple(values)

    def string_field(self, key: str) -> str | None:
        field = self._reader.get_field(key)
        if field is None:
            return None
        value = field.contents()
        return value if isinstance(value, str) else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds (for the log line a user reads)."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.qtype.name] = counts.get(tensor.qtype.name, 0) + 1
        return counts

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())


def _open_reader(gguf, path: str):
    try:
        return gguf.GGUFReader(path, "r")
    except FileNotFoundError:
        raise
    except Exception as exc:  # the reader raises ValueError/struct errors/IndexError for bad bytes
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF signature). "
                                  "Rename it to its real extension or fetch the .gguf again.") from exc
        raise CheckpointError(f"{path}: the GGUF file is damaged or truncated ({exc}). The download was "
                              "probably cut short; fetch it again.") from exc
