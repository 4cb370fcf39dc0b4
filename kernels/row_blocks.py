"""What the tiled PyTorch losses share (kernels/contrastive/chunked.py, kernels/siglip/chunked.py):
how many rows of logits one block holds, and the dtype a block is computed in (which the
references of those losses compute in too)."""
import torch

# Elements in one tile of logits. 2^24 (64 MiB in fp32; a few live at once) is far below the
# reference's footprint from 8k columns on, and the tiles stay large enough for full speed;
# rows per block are never fewer than MIN_ROWS, because the gradient of the columns is a
# [N, rows] @ [rows, D] product whose speed is bound by memory when rows is small.
TILE_ELEMENTS = 1 << 24
MIN_ROWS = 128


def block_rows(rows: int, columns: int) -> int:
    return max(1, min(rows, max(MIN_ROWS, TILE_ELEMENTS // max(columns, 1))))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half types; fp32 and fp64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)
