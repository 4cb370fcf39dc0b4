"""Run every evaluator the held-out set supports. Every rank calls it (ZeRO-3 needs all ranks
in each forward); every rank gets the same numbers and rank 0 logs them.

A stop signal may arrive during a long evaluation: `interrupted` (the ranks' agreement on
it, engine/train/faults.py) is asked between batches, at the same points on every rank, and
a yes ends the evaluation on every rank together with EvaluationInterrupted."""
from typing import Callable

import torch

from engine.data.eval_set import EvalSet
from engine.eval.retrieval import retrieval_metrics
from engine.eval.zeroshot import class_prompts, classifier_from_prompts, topk_accuracy

BATCH = 256


class EvaluationInterrupted(Exception):
    """Every rank stopped evaluating at the same batch because a stop was agreed."""


@torch.no_grad()
def encode_batched(encode, items, device, interrupted: Callable[[], bool] | None) -> torch.Tensor:
    parts = []
    for i in range(0, len(items), BATCH):
        if interrupted is not None and interrupted():
            raise EvaluationInterrupted
        parts.append(encode(items[i:i + BATCH].to(device)).float())
    return torch.cat(parts).cpu()


@torch.no_grad()
def evaluate(model, eval_set: EvalSet, tokenizer, device: torch.device,
             clean_text: Callable[[str], str] | None = None,
             interrupted: Callable[[], bool] | None = None) -> dict[str, float]:
    """`clean_text`: the normalisation training applied to captions (CLIP-Lite strips
    punctuation), applied here to the held-out captions and the zero-shot prompts too: a text
    tower never trained on "." must not meet one at evaluation."""
    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer([clean_text(t) for t in texts] if clean_text else texts)

    was_training = model.training
    model.eval()
    try:
        image = encode_batched(model.encode_image, eval_set.images, device, interrupted)
        text = encode_batched(model.encode_text, tokens(eval_set.captions), device, interrupted)
        metrics = retrieval_metrics(image, text)
        if eval_set.labels is not None and eval_set.classnames and eval_set.templates:
            prompts = class_prompts(eval_set.classnames, eval_set.templates)
            prompt_embeddings = encode_batched(model.encode_text, tokens(prompts), device, interrupted)
            classifier = classifier_from_prompts(prompt_embeddings, len(eval_set.classnames))
            metrics.update(topk_accuracy(image, classifier, eval_set.labels))
    finally:
        model.train(was_training)
    return metrics
