"""Zero-shot classification: class names x prompt templates -> one text embedding per class."""
import torch
import torch.nn.functional as F


def class_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """Prompts grouped by class: class 0 with every template, then class 1, ..."""
    return [t.format(c) for c in classnames for t in templates]


def classifier_from_prompts(prompt_embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[classes * templates, D] normalised -> [classes, D]: the mean over templates,
    re-normalised (CLIP's prompt ensembling)."""
    per_class = prompt_embeddings.reshape(num_classes, -1, prompt_embeddings.shape[-1]).mean(1)
    return F.normalize(per_class, dim=-1)


def topk_accuracy(image_embeddings: torch.Tensor, classifier: torch.Tensor,
                  labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    scores = image_embeddings @ classifier.T
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"zeroshot_top{k}": hits[:, :k].any(1).float().mean().item()
            for k in ks if k <= scores.shape[1]}
