"""Image <-> text retrieval recall@k on paired embeddings (row i of each is a true pair)."""
import torch


def recall_at_k(query: torch.Tensor, keys: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose own pair (same row index) ranks in the top k keys."""
    scores = query @ keys.T
    own = scores.diagonal()[:, None]
    # Rank = how many keys score strictly higher than the true pair.
    rank = (scores > own).sum(1)
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    i2t, t2i = recall_at_k(image, text, ks), recall_at_k(text, image, ks)
    return {**{f"retrieval_i2t_r{k}": v for k, v in i2t.items()},
            **{f"retrieval_t2i_r{k}": v for k, v in t2i.items()}}
