"""Run every evaluator the held-out set supports. Every rank calls it (ZeRO-3 needs all ranks
in each forward); every rank gets the same numbers and rank 0 logs them.

The work is split over the ranks (engine/eval/shard.py): each rank encodes the images and
captions of its block of the set (engine/eval/eval_set.py loads only that block) and its block
of the zero-shot prompts, and the embeddings are all-gathered, so that every rank scores the
whole set, as one process would.

A stop signal may arrive during a long evaluation: `interrupted` (the ranks' agreement on
it, engine/train/stop_signals.py) is asked between batches, at the same points on every rank, and
a yes ends the evaluation on every rank together with EvaluationInterrupted (shard.py)."""
from typing import Callable, NamedTuple

import torch

from engine.eval.eval_set import EvalSet
from engine.eval.retrieval import retrieval_metrics
from engine.eval.shard import BATCH, encode_in_step, encode_texts, gather_kept
from engine.eval.zeroshot import class_prompts, classifier_from_prompts, topk_accuracy


class HeldOutEmbeddings(NamedTuple):
    """The whole held-out set's, on the CPU, in sample order: row i of each is one sample."""
    image: torch.Tensor            # [K, D]
    text: torch.Tensor             # [K, D]
    ids: torch.Tensor              # [K] sample ids (the bad records' are missing)
    labels: torch.Tensor | None    # [K] when the set has classes


@torch.no_grad()
def held_out_embeddings(model, eval_set: EvalSet, tokens: Callable[[list[str]], torch.Tensor], device,
                        interrupted: Callable[[], bool] | None = None) -> HeldOutEmbeddings:
    """This rank's block of the set encoded, and its peers' gathered (a collective when split)."""
    ranks, rows = eval_set.ranks, eval_set.ranks.padded_rows(eval_set.size)
    images = eval_set.images
    image = encode_in_step(model.encode_image, [images], rows=rows, window=BATCH,
                           filler=lambda: torch.zeros((1, *images.shape[1:]), dtype=images.dtype),
                           device=device, interrupted=interrupted)
    captions = [tokens(eval_set.captions)] if eval_set.captions else []
    text = encode_in_step(model.encode_text, captions, rows=rows, window=BATCH, filler=lambda: tokens([""]),
                          device=device, interrupted=interrupted)
    labels = [] if eval_set.labels is None else [eval_set.labels]
    (image, text, *labels), ids = gather_kept([image, text, *labels], eval_set.ids, rows, ranks, device)
    return HeldOutEmbeddings(image, text, ids, labels[0] if labels else None)


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
        whole = held_out_embeddings(model, eval_set, tokens, device, interrupted)
        metrics = retrieval_metrics(whole.image, whole.text)
        if whole.labels is not None and eval_set.classnames and eval_set.templates:
            prompts = class_prompts(eval_set.classnames, eval_set.templates)
            prompt_embeddings = encode_texts(model.encode_text, prompts, tokens, eval_set.ranks, device, interrupted)
            classifier = classifier_from_prompts(prompt_embeddings, len(eval_set.classnames))
            metrics.update(topk_accuracy(whole.image, classifier, whole.labels))
    finally:
        model.train(was_training)
    return metrics
