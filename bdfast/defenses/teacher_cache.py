"""MEDIC's teacher cache: the frozen teacher's hooked outputs t and proxy gradients g, computed
once per image in the first epoch and looked up by the image's content afterwards.

The teacher is frozen and in eval mode, so t, g (and the teacher's argmax label) are functions of
the image (and of the given label, which g depends on) alone. A loader that yields the same
images every epoch, in any order and any batching, then repeats the teacher's work 60 times;
this cache does it once.

**Which images a batch holds** is read from the images themselves, not from indices: each image
gets two exact 64-bit fingerprints, ``sum_i bits(x_i) * w_i`` in wrapping int64 arithmetic, with
``bits`` the image's float pixels reinterpreted as integers and ``w`` two fixed vectors of random
odd int64 weights (mixed with the label when the given labels are used). Integer arithmetic
modulo 2**64 is exact, so a fingerprint does not depend on the batch's size, order or device.
Epoch 1 stores one row per image; later epochs ``searchsorted`` the first fingerprint in the
sorted table and require the second to match too, so a collision of one 64-bit hash cannot mix
two images. Shuffling and re-batching are followed; an image epoch 1 did not see (a loader that
augments, subsamples differently or changes labels) is a *miss*, which is always detected: the
step then computes the teacher as without the cache (``"auto"``: one warning, the cache is
dropped) or raises (``True``).

Shapes: per hooked layer l the table holds ``t[l], g[l]`` as ``[N, C_l, *spatial_l]`` rows in
``dtype`` (float32 or a 16-bit type; ``[N, *spatial_l, C_l]`` when the outputs store their
channels innermost, as channels-last maps and token outputs do),
with ``keys [N]`` (int64, sorted), ``check [N]`` (int64) and ``labels [N]`` (int64). See
docs/medic.md for the memory per image.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from bdfast._utils import channels_innermost

__all__ = ["CACHE_DTYPES", "TeacherCache", "fingerprints", "default_budget",
           "resolve_cache_dtype"]

CACHE_DTYPES = ("auto", torch.float32, torch.bfloat16, torch.float16)
CacheSpec = Union[str, bool]
_DTYPE_NAMES = ("float32", "bfloat16", "float16")

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEIGHT_SEED = 0x5EED_CAC4E  # fixed: the fingerprints never touch torch's global RNG
_LABEL_WEIGHTS = (0x9E3779B97F4A7C15 - (1 << 64), 0xC2B2AE3D27D4EB4F - (1 << 64))


def fingerprints(x: Tensor, y: Optional[Tensor] = None,
                 weights: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Two exact int64 fingerprints [B] of the images x [B, ...] (and labels y [B] if given).

    Each is ``sum_i bits(x_b,i) * w_i (+ (y_b + 1) * c)`` modulo 2**64, where ``bits`` are the
    pixels' IEEE bit patterns as signed integers and ``w`` fixed random odd int64 weights (from
    :func:`fingerprint_weights` unless ``weights`` is given). The same image gives the same
    fingerprint in any batch, on any device; the memory layout (e.g. channels_last) does not
    matter, only the values in logical order.
    """
    flat = x.detach().reshape(len(x), -1).contiguous()
    bits = flat.view(_INT_OF[flat.element_size()]).long()
    if weights is None:
        weights = fingerprint_weights(flat.shape[1], x.device)
    keys = []
    for w, c in zip(weights, _LABEL_WEIGHTS):
        key = (bits * w).sum(dim=1)
        if y is not None:
            key = key + (y.to(torch.int64) + 1) * c
        keys.append(key)
    return keys[0], keys[1]


def fingerprint_weights(size: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Two fixed vectors [size] of random odd int64 weights (the same in every process)."""
    generator = torch.Generator().manual_seed(_WEIGHT_SEED)
    pair = torch.randint(-(1 << 62), 1 << 62, (2, size), generator=generator, dtype=torch.int64)
    pair = (pair * 2 + 1).to(device)  # odd: a one-pixel change always changes the sum
    return pair[0], pair[1]


def default_budget(device: torch.device) -> int:
    """Bytes the cache may use by default: a quarter of the free memory of ``device`` (the
    GPU's free memory on CUDA, MemAvailable of /proc/meminfo on the CPU; 2 GiB if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2 << 30


def resolve_cache_dtype(dtype) -> Optional[torch.dtype]:
    """``None`` for "auto" (see :class:`TeacherCache`), else the dtype, given as a
    ``torch.dtype`` or by its name ("float16", as the command line passes it); ValueError
    otherwise."""
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        dtype = getattr(torch, dtype, dtype) if dtype in _DTYPE_NAMES else dtype
    if isinstance(dtype, torch.dtype) and dtype in CACHE_DTYPES:
        return dtype
    raise ValueError("cache_dtype must be 'auto', torch.float32, torch.bfloat16 or "
                     f"torch.float16 (or their names), got {dtype!r}")


class TeacherCache:
    """The table of one run; :class:`bdfast.defenses.medic.MedicStep` drives it.

    ``mode`` is True (a miss or an over-budget table raises ValueError) or "auto" (they switch the
    cache off with one warning, and the step computes the teacher). ``budget`` is in bytes;
    ``batches`` the loader's length when known (to refuse an oversize table at the first batch).
    ``dtype``: the storage dtype; None ("auto") keeps 16-bit outputs as they are (exact, e.g.
    under bfloat16 autocast) and float32 ones in float32 (exact) when the loader's length says
    the whole table fits ``budget``, else as ``t`` float16 and ``g`` bfloat16 (see
    docs/medic.md: float16 keeps 3 more bits of t, bfloat16 keeps g's tiny values from
    underflowing). ``rescale``: g is proportional to 1/B (batch-mean CE), so rows are stored
    times B and divided by the current batch's B on a hit.
    """

    def __init__(self, mode: CacheSpec, *, budget: int, dtype: Optional[torch.dtype] = None,
                 batches: Optional[int] = None, rescale: bool = False):
        self.mode, self.budget, self.dtype, self.batches = mode, int(budget), dtype, batches
        self.rescale = rescale
        self.active = True
        self.ready = False
        self.hits = 0
        self.reason = ""
        self._weights: Optional[Tuple[Tensor, Tensor]] = None
        # Epoch 1: [keys, check, labels, t..., g...] per batch.
        self._chunks: List[List[Tensor]] = []
        self._table: List[Tensor] = []
        self._layers = 0
        self._out_dtypes: List[torch.dtype] = []
        self._shape: Optional[torch.Size] = None
        self.bytes_per_image = 0
        self.images = 0
        self._t_wide = False
        self._narrow = False  # "auto" stores float32 outputs in 16 bits (the table is too big)
        self._numels: List[int] = []
        # Columns whose outputs store their channels innermost (channels-last maps, token
        # outputs [B, L, C] seen as [B, C, L]): stored as [N, *spatial, C] rows, so that a
        # looked-up batch has that layout again and the loss kernel reads t, s and g in place.
        self._inner: List[bool] = []

    # -- epoch 1 ----------------------------------------------------------------------------
    def keys(self, x: Tensor, y: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The two fingerprints [B] of a batch (``y``: the given labels when the step uses them)."""
        if self._weights is None:
            self._weights = fingerprint_weights(x[0].numel(), x.device)
        return fingerprints(x, y, self._weights)

    def store(self, x: Tensor, keys: Tuple[Tensor, Tensor], labels: Tensor,
              t: Sequence[Tensor], g: Sequence[Tensor]) -> None:
        """Keep one batch's rows (epoch 1). May switch the cache off (or raise) over budget."""
        if not self.active:
            return
        if self._shape is None:
            self._shape, self._layers = x.shape[1:], len(t)
            self._out_dtypes = [v.dtype for v in (*t, *g)]
            self._numels = [v[0].numel() for v in (*t, *g)]
            self._inner = [channels_innermost(v) and not v.is_contiguous() for v in (*t, *g)]
            self.bytes_per_image = self._row_bytes()
            if self.batches is not None:
                needed = self.batches * len(x) * self.bytes_per_image
                if self.dtype is None and needed > self.budget:
                    self._narrow = True
                    self.bytes_per_image = self._row_bytes()
                self._check_budget(self.batches * len(x), estimate=True)
        elif x.shape[1:] != self._shape:
            self._miss(f"the loader yielded images of shape {list(x.shape[1:])} after "
                       f"{list(self._shape)}")
            return
        self._check_budget(self.images + len(x))
        if not self.active:
            return
        rows = [keys[0], keys[1], labels.detach().long()]
        for i, v in enumerate((*t, *g)):
            v = v.detach()
            if self.rescale and i >= self._layers:  # store B * g: the per-sample gradient
                v = (v.float() * len(x)).to(v.dtype)
            if self._inner[i]:
                v = v.movedim(1, -1)
            stored = v.to(self._storage(v.dtype, i < self._layers)).contiguous()
            if (self._narrow and stored.dtype == torch.float16 and v.dtype == torch.float32
                    and not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(v).all())):
                self._widen_t()  # a value past float16's 65504: keep t in float32 instead
                stored = v.contiguous()  # (already moved for a channels-innermost column)
            rows.append(stored)
        self._chunks.append(rows)
        self.images += len(x)

    def finish_filling(self) -> None:
        """Sort the table by the first fingerprint (called once, before the second epoch)."""
        if self.ready or not self.active:
            return
        columns = list(zip(*self._chunks))
        self._chunks = []
        keys = torch.cat(columns[0])
        order = torch.argsort(keys)
        self._table = [keys[order]]
        for i in range(1, len(columns)):
            column = torch.cat(columns[i])
            columns_i = column.index_select(0, order)
            del column
            self._table.append(columns_i)
        self.ready = True

    # -- later epochs -----------------------------------------------------------------------
    def lookup(self, x: Tensor, keys: Tuple[Tensor, Tensor]
               ) -> Optional[Tuple[List[Tensor], List[Tensor], Tensor]]:
        """``(t, g, labels)`` of the batch from the table, in the dtypes the teacher gave; None
        on a miss (which the mode turns into a warning or an error)."""
        if not self.active:
            return None
        if x.shape[1:] != self._shape:
            self._miss(f"the loader yielded images of shape {list(x.shape[1:])} in a later epoch "
                       f"after {list(self._shape)} in epoch 1")
            return None
        table = self._table
        rows = torch.searchsorted(table[0], keys[0]).clamp_(max=len(table[0]) - 1)
        hit = (table[0][rows] == keys[0]) & (table[1][rows] == keys[1])
        if not bool(hit.all()):  # one host sync per step, for a decision before using the rows
            self._miss("the loader yielded an image in a later epoch that epoch 1 did not")
            return None
        self.hits += len(x)
        labels = table[2][rows]
        values = []
        for column, dtype, inner in zip(table[3:], self._out_dtypes, self._inner):
            value = column.index_select(0, rows)
            values.append((value.movedim(-1, 1) if inner else value).to(dtype))
        if self.rescale:  # the rows are fresh tensors: divide in place
            for v in values[self._layers:]:
                v.div_(len(x))
        return values[:self._layers], values[self._layers:], labels

    def summary(self) -> dict:
        """What ``MedicResult.timings["cache"]`` reports."""
        return {"used": self.active and self.ready, "images": self.images,
                "bytes_per_image": self.bytes_per_image,
                "bytes": self.bytes_per_image * self.images if self.active else 0,
                "hits": self.hits, "reason_off": self.reason}

    # -- internals --------------------------------------------------------------------------
    def _storage(self, dtype: torch.dtype, is_t: bool) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        if dtype != torch.float32 or not self._narrow:
            return dtype  # kept exactly: float32 when it fits, 16-bit outputs (autocast) always
        if is_t:
            return torch.float32 if self._t_wide else torch.float16
        return torch.bfloat16

    def _widen_t(self) -> None:
        """Store t in float32 from now on, and convert the rows stored so far."""
        self._t_wide = True
        for rows in self._chunks:
            for i in range(3, 3 + self._layers):
                rows[i] = rows[i].float()
        self.bytes_per_image = self._row_bytes()

    def _row_bytes(self) -> int:
        """Bytes of one image's row: two fingerprints, the label, and t and g of every layer."""
        return 24 + sum(n * self._storage(d, i < self._layers).itemsize
                        for i, (n, d) in enumerate(zip(self._numels, self._out_dtypes)))

    def _check_budget(self, images: int, estimate: bool = False) -> None:
        need = images * self.bytes_per_image
        if need <= self.budget:
            return
        what = "would need about" if estimate else "needs"
        self._off(f"the teacher cache {what} {need / 2**20:.1f} MiB "
                  f"({self.bytes_per_image} bytes per image x {images} images), more than "
                  f"cache_budget={self.budget} bytes; raise cache_budget, use a 16-bit "
                  "cache_dtype, or pass cache_teacher=False")

    def _miss(self, what: str) -> None:
        if self.mode is True:
            raise ValueError(f"{what}; cache_teacher=True needs a loader that yields the same "
                             "images (and labels) every epoch, with no random augmentation")
        self._off(what)

    def _off(self, why: str) -> None:
        if self.mode is True:
            raise ValueError(why)
        if self.active:
            warnings.warn(f"medic_clone: the teacher cache is off for the rest of the run: {why}. "
                          "The teacher is computed every step instead (the results are the same).",
                          RuntimeWarning, stacklevel=4)
        self.active, self.reason = False, why
        self._chunks, self._table = [], []
