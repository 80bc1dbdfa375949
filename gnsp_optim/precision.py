r"""Statistics of low-precision activations, accumulated in float32 without a float32 copy of the batch.

Under bf16 / fp16 autocast a protected layer's input ``X`` (``n x d``) arrives in 16 bits. Today's
:meth:`~gnsp_optim.statistics.CovarianceStat.update` converts the whole batch (``x.to(float32)``): a transient
``n x d`` float32 copy, twice the bytes of the activation itself (for a ViT-B/16 batch of 256 images:
``256 * 197 * 3072 * 4`` bytes = 620 MB at the MLP's hidden width). :func:`add_augmented_gram_` instead
upcasts ``chunk_rows`` rows at a time and accumulates each chunk's ``X_c^T X_c`` straight into the float32
buffer, so the transient is ``chunk_rows x d`` floats whatever the batch size; the column sums use
``sum(dtype=float32)``, which accumulates in float32 without any copy.

Accuracy: the product of two bf16 (8-bit significand) or fp16 (11-bit) numbers is exact in float32 (24-bit
significand), so chunking changes only the order of float32 additions. Against the float32-copy twin
(:func:`add_augmented_gram_reference`) every entry agrees to within ``n * eps32 * sum_r |x_ri| |x_rj|``
(the usual bound for two summation orders; ``eps32 = 2^-24``); the tests check
``|diff| <= 4 * n * eps32 * (|X|^T |X|)`` entrywise.

On CUDA, torch 2.13 has ``torch.mm(a, b, out_dtype=torch.float32)`` (``aten::mm.dtype``, for fp16 / bf16
inputs), which would produce the float32 Gram from 16-bit inputs with no upcast at all; the CPU backend does
not implement it (``NotImplementedError`` on 2.13.0+cpu), so it is not used here and remains to be measured
on a GPU (see ``docs/design/scale.md``).

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    >>> out = torch.zeros(1, 3, 3)
    >>> add_augmented_gram_(out, x, chunk_rows=1)
    >>> out[0].tolist()
    [[10.0, 14.0, 4.0], [14.0, 20.0, 6.0], [4.0, 6.0, 2.0]]
"""

from __future__ import annotations

import torch

__all__ = ["add_augmented_gram_", "add_augmented_gram_reference", "DEFAULT_CHUNK_ROWS"]

#: rows upcast at a time: 4096 rows x 3072 inputs x 4 bytes = 48 MB of transient float32
DEFAULT_CHUNK_ROWS = 4096


def _as_groups(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if out.dim() != 3 or out.shape[-1] != out.shape[-2]:
        raise ValueError(f"out must be (G, d+1, d+1), got {tuple(out.shape)}")
    if not out.dtype.is_floating_point or out.element_size() < 4:
        raise ValueError(f"out must be float32 or float64 (the accumulation dtype), got {out.dtype}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    d = out.shape[-1] - 1
    if x.dim() != 3 or x.shape[-1] != d or x.shape[0] not in (1, out.shape[0]):
        raise ValueError(f"x must be (n, {d}) or ({out.shape[0]}, n, {d}), got {tuple(x.shape)}")
    return x


@torch.no_grad()
def add_augmented_gram_(out: torch.Tensor, x: torch.Tensor, chunk_rows: int | None = None,
                        scale: float = 1.0) -> None:
    r"""``out += scale * [X | 1]^T [X | 1]`` in ``out``'s dtype, upcasting ``x`` ``chunk_rows`` rows at a time.

    ``out`` is ``(G, d+1, d+1)`` (float32 or float64), ``x`` is ``(n, d)`` (the same rows for every group) or
    ``(G, n, d)`` in any floating dtype. Autocast is switched off inside. The transient float32 memory is
    ``G * chunk_rows * d`` elements (default :data:`DEFAULT_CHUNK_ROWS`).

    Example:
        >>> out = torch.zeros(1, 2, 2, dtype=torch.float64)
        >>> add_augmented_gram_(out, torch.ones(5, 1, dtype=torch.float16))
        >>> out[0].tolist()
        [[5.0, 5.0], [5.0, 5.0]]
    """
    x = _as_groups(out, x)
    chunk = DEFAULT_CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    n, d = x.shape[1], x.shape[2]
    if n == 0:
        return
    with torch.autocast(device_type=x.device.type, enabled=False):
        for start in range(0, n, chunk):
            xc = x[:, start:start + chunk].to(out.dtype)  # the only float32 copy: chunk x d per group
            out[:, :d, :d].baddbmm_(xc.transpose(1, 2), xc, alpha=scale)
        col = x.sum(dim=1, dtype=out.dtype)  # accumulates in out.dtype, no upcast copy of x
        out[:, :d, d] += scale * col
        out[:, d, :d] += scale * col
        out[:, d, d] += scale * float(n)


def add_augmented_gram_reference(out: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> None:
    """Slow, obvious twin of :func:`add_augmented_gram_`: one float copy of the whole batch, one product.

    Example:
        >>> out = torch.zeros(1, 2, 2)
        >>> add_augmented_gram_reference(out, torch.full((3, 1), 2.0, dtype=torch.bfloat16))
        >>> out[0].tolist()
        [[12.0, 6.0], [6.0, 3.0]]
    """
    x = _as_groups(out, x).to(out.dtype)
    ones = torch.ones(*x.shape[:2], 1, dtype=out.dtype, device=x.device)
    xa = torch.cat([x, ones], dim=-1)
    out += scale * (xa.transpose(1, 2) @ xa)
