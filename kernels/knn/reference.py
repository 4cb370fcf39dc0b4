"""Top-k cosine neighbours in plain PyTorch: the truth for DeCLIP's nearest-neighbour supervision.

Stores the full [N, Q] similarity matrix; the fast paths (chunked.py, triton.py) stream the bank.
"""
import torch


def check_inputs(q: torch.Tensor, bank: torch.Tensor, k: int) -> torch.dtype:
    """Raise ValueError for shapes or k the search is undefined on; return the dtype to compute in.

    Shared by all backends so they reject the same inputs and promote the same way.
    """
    if q.dim() != 2 or bank.dim() != 2 or q.shape[1] != bank.shape[1]:
        raise ValueError(f"q must be [N, D] and bank [Q, D] with the same D; "
                         f"got {tuple(q.shape)}, {tuple(bank.shape)}")
    if not isinstance(k, int) or not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, Q={bank.shape[0]}]; got k={k}")
    return torch.promote_types(torch.promote_types(q.dtype, bank.dtype), torch.float32)


@torch.no_grad()
def nearest_neighbors(q: torch.Tensor, bank: torch.Tensor,
                      k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k bank rows most similar to each query row.

    q:    [N, D] L2-normalised queries; bank: [Q, D] L2-normalised rows (e.g. the text queue).
    Both are normalised by the caller, so the dot product is the cosine similarity.
    Returns (values [N, k], indices [N, k] int64), values descending, equal similarities
    ordered by lower bank index. No gradient: DeCLIP uses the neighbours as detached targets.
    Similarities are computed in float32 (float64 for float64 inputs) so a half-precision
    bank ranks exactly as its float32 copy would.
    """
    dtype = check_inputs(q, bank, k)
    sims = q.to(dtype) @ bank.to(dtype).T
    # torch.topk does not specify the order of equal values; a stable descending sort keeps
    # equal similarities in their original (ascending index) order, so ties go to the lower index.
    values, indices = torch.sort(sims, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]
