"""Top-k cosine neighbours in tiled PyTorch (any device): the bank is streamed, never [N, Q] at once.

The bank is read in blocks of columns, each cast to the compute dtype on its own; for each
block the queries are taken in row blocks so that one similarity block holds about
BLOCK_ELEMENTS values. Each block's exact top-k is merged into a running [N, k] top-k.
Memory beyond the inputs: one similarity block, the float32 copy of q for half inputs, and
the running result, instead of the reference's N x Q similarities plus its full sort.

Ties: the reference orders equal similarities by lower bank index. torch.topk leaves both
the choice among equal values at the k-th place and their order unspecified, so
`_top_k_exact` orders its picks explicitly and re-sorts (stably) the few rows where values
equal to the k-th one did not all fit; the blocks arrive in index order, so merging the
running top-k before the new block's keeps the rule across blocks.
"""
import torch

from kernels.knn.reference import check_inputs

# One similarity block: 4M values, 16 MB in float32.
BLOCK_ELEMENTS = 1 << 22
# Bank rows per block: wide enough for a good matrix product, small enough that the rows of
# a block stay numerous.
BLOCK_COLUMNS = 2048


def _top_k_exact(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values, descending, equal values by lower column: (values, columns)."""
    if k == 1:
        # argmax returns the first maximal value (documented), i.e. the lowest column.
        columns = values.argmax(dim=1, keepdim=True)
        return values.gather(1, columns), columns
    top, columns = values.topk(k, dim=1)
    # Order the picks by column, then stably by value: equal values end up by lower column.
    columns, order = columns.sort(dim=1)
    top, order = top.gather(1, order).sort(dim=1, descending=True, stable=True)
    columns = columns.gather(1, order)
    # Where more values than slots equal the k-th one, topk may have taken any of them.
    crowded = ((values >= top[:, -1:]).sum(dim=1) > k).nonzero().squeeze(1)
    if crowded.numel():
        redo_values, redo_columns = values[crowded].sort(dim=1, descending=True, stable=True)
        top[crowded], columns[crowded] = redo_values[:, :k], redo_columns[:, :k]
    return top, columns


@torch.no_grad()
def nearest_neighbors(q: torch.Tensor, bank: torch.Tensor, k: int = 1,
                      block_columns: int = BLOCK_COLUMNS,
                      block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (values [N, k], indices [N, k] int64), computed block by block.

    block_columns: bank rows per block (raised to k so the first block fills the top-k);
    block_elements: similarity values per block, which sets the query rows per block.
    """
    dtype = check_inputs(q, bank, k)
    n, size = q.shape[0], bank.shape[0]
    columns = max(k, block_columns)
    rows = max(1, block_elements // columns)
    queries = q.to(dtype)
    best_values = best_indices = None
    for first in range(0, size, columns):
        block = bank[first:first + columns].to(dtype)
        width = block.shape[0]
        block_values = torch.empty(n, min(k, width), dtype=dtype, device=q.device)
        block_indices = torch.empty(n, min(k, width), dtype=torch.int64, device=q.device)
        for start in range(0, n, rows):
            sims = queries[start:start + rows] @ block.T
            top, cols = _top_k_exact(sims, min(k, width))
            block_values[start:start + rows], block_indices[start:start + rows] = top, cols + first
        if best_values is None:
            # The first block is at least k wide (k <= Q and columns >= k).
            best_values, best_indices = block_values, block_indices
            continue
        # Earlier blocks hold lower indices, so they go first: equal values keep that order.
        merged_values = torch.cat((best_values, block_values), dim=1)
        best_values, picks = _top_k_exact(merged_values, k)
        best_indices = torch.cat((best_indices, block_indices), dim=1).gather(1, picks)
    return best_values, best_indices
