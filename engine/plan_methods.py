"""Part of the planner: the options one objective has and the others do not.

DeCLIP: the nearest-neighbour queue (size, global or per-rank enqueue) and whether EDA can
draw synonyms from WordNet. CLIP-Lite: where the one negative per positive comes from and the
form of the prior-matching term. Each is resolved with its reason like every other decision;
an option given for a method that does not have it is refused.
"""
from engine.errors import UserError
from engine.recipes import Recipe

METHOD_OPTIONS = ("queue_size", "enqueue", "eda_synonyms", "negatives", "prior")
ENQUEUE = ("global", "rank")
NEGATIVES = ("local", "global")
PRIORS = ("cooperative", "adversarial", "off")
ACCUMULATIONS = ("feature_cache", "plain")
_OWNER = {"queue_size": "declip", "enqueue": "declip", "negatives": "clip-lite", "prior": "clip-lite"}


def objective_options(dials, recipe: Recipe, *, dataset_size: int,
                      wordnet: str | None) -> list[tuple[str, object, str]]:
    """(name, value, reason) for every name in METHOD_OPTIONS; value None where not applicable."""
    for name, method in _OWNER.items():
        if getattr(dials, name) is not None and recipe.method != method:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is an option of --method {method}, not {recipe.method}: drop it")
    if recipe.method == "declip":
        return [_queue_size(dials, recipe, dataset_size),
                _choice(dials.enqueue, "--enqueue", ENQUEUE, "enqueue", "global",
                        "every rank enqueues the whole global batch, so queues agree across ranks "
                        "(the reference enqueues per rank)"),
                _synonyms(wordnet), *_absent(("negatives", "prior"), recipe.method)]
    if recipe.method == "clip-lite":
        return [*_absent(("queue_size", "enqueue", "eda_synonyms"), recipe.method),
                _choice(dials.negatives, "--negatives", NEGATIVES, "negatives", "local",
                        f"{recipe.source}: the caption of the next pair in each rank's batch"),
                _choice(dials.prior, "--prior", PRIORS, "prior", "cooperative",
                        f"{recipe.source}: prior matching minimised jointly with the encoders")]
    return _absent(METHOD_OPTIONS, recipe.method)


def _absent(names, method: str) -> list[tuple[str, None, str]]:
    return [(name, None, f"not an option of {method}") for name in names]


def _queue_size(dials, recipe: Recipe, dataset_size: int) -> tuple[str, int, str]:
    if dials.queue_size is not None:
        if dials.queue_size < 1:
            raise UserError(f"--queue-size {dials.queue_size} must be at least 1")
        return "queue_size", dials.queue_size, "--queue-size given"
    if recipe.queue_size > dataset_size:
        return "queue_size", dataset_size, (f"recipe's {recipe.queue_size:,} capped at the "
                                            f"{dataset_size:,} training pairs")
    return "queue_size", recipe.queue_size, recipe.source


def _choice(given: str | None, flag: str, allowed: tuple[str, ...], name: str, default: str,
            reason: str) -> tuple[str, str, str]:
    if given is None:
        return name, default, reason
    if given not in allowed:
        raise UserError(f"{flag} {given!r} is unknown: use one of {', '.join(allowed)}")
    return name, given, f"{flag} given"


def _synonyms(wordnet: str | None) -> tuple[str, bool, str]:
    if wordnet is not None:
        return "eda_synonyms", True, f"EDA draws synonyms from WordNet at {wordnet}"
    return "eda_synonyms", False, ("no WordNet database found (apt-get install wordnet-base, or "
                                   "NLTK's wordnet corpus): EDA swaps and deletes words only")


def check_micro_batch(method: str, micro: int, per_rank: int) -> None:
    """DeCLIP's SimSiam heads and CLIP-Lite's critic normalise over the micro-batch (BatchNorm1d),
    and CLIP-Lite's negative is another row of it: one sample per micro-batch cannot train."""
    if method in ("declip", "clip-lite") and micro < 2:
        hint = (f"--micro-batch {per_rank}" if per_rank >= 2
                else "a --global-batch of at least 2 per rank")
        raise UserError(f"--method {method} needs at least 2 samples per micro-batch (its heads use "
                        f"batch statistics): use {hint}")


def accumulation(given: str | None, grad_accum: int) -> tuple[str, str]:
    """How micro-batches of one step accumulate: "feature_cache" keeps the global-batch loss
    (engine/train/gradcache.py), "plain" contrasts each micro-batch within itself."""
    if given is not None and given not in ACCUMULATIONS:
        raise UserError(f"--accumulation {given!r} is unknown: use one of {', '.join(ACCUMULATIONS)}")
    if given is not None:
        return given, "--accumulation given"
    if grad_accum == 1:
        return "plain", "one micro-batch per step: nothing to accumulate"
    return "feature_cache", ("embeddings of every micro-batch cached, then recomputed with "
                             "gradients: the terms that compare samples span the whole global "
                             "batch (GradCache)")
