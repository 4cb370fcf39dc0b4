"""Part of the planner: the options an objective declares for itself, and the checks it asks
for (engine/objectives/base.py). Each option is resolved with its reason like every other
decision; an option given for a method that does not declare it is refused, naming the
methods that do.
"""
from engine.errors import UserError
from engine.objectives.base import Option, OptionContext
from engine.objectives.method import Method
from engine.objectives.registry import methods_declaring
from engine.plan.dials import ACCUMULATIONS, flag_name as flag


def parse_option(option: Option, raw) -> object:
    """The command line's text (or a value given in code) as the option's value; UserError if not allowed."""
    try:
        value = option.kind(raw)
    except (TypeError, ValueError) as error:
        raise UserError(f"{flag(option.name)} {raw!r}: not a {option.kind.__name__} ({error})") from error
    if option.choices is not None and value not in option.choices:
        raise UserError(f"{flag(option.name)} {raw!r} is unknown: use one of {', '.join(map(str, option.choices))}")
    return value


def objective_options(method: Method, given: dict, context: OptionContext) -> list[tuple[str, object, str]]:
    """(name, value, reason) for every option `method` declares, in its order; `given`: the
    options on the command line, by name."""
    for name in given:
        if name not in method.dialled_options:
            owners = methods_declaring(name)
            where = f"an option of --method {' or '.join(owners)}, not {method.name}" if owners else \
                f"not an option of --method {method.name}"
            raise UserError(f"{flag(name)} is {where}: drop it")
    resolved = []
    for option in method.options:
        value = parse_option(option, given[option.name]) if option.name in given else None
        if option.decide is not None:
            value, reason = option.decide(value, context)
        elif value is not None:
            reason = f"{flag(option.name)} given"
        else:
            value = dict(context.recipe.options).get(option.name, option.default)
            reason = option.reason.format(source=context.recipe.source) or context.recipe.source
        resolved.append((option.name, value, reason))
    return resolved


def check_micro_batch(method: Method, micro: int, per_rank: int) -> None:
    """Heads that normalise over the micro-batch (DeCLIP's SimSiam, CLIP-Lite's critic) and a
    negative drawn from it cannot train on fewer samples than the objective declares."""
    least = method.objective.min_micro_batch
    if micro < least:
        hint = (f"--micro-batch {per_rank}" if per_rank >= least
                else f"a --global-batch of at least {least} per rank")
        raise UserError(f"--method {method.name} needs at least {least} samples per micro-batch (its heads use "
                        f"batch statistics): use {hint}")


def accumulation(given: str | None, grad_accum: int) -> tuple[str, str]:
    """How micro-batches of one step accumulate (ACCUMULATIONS)."""
    if given is not None and given not in ACCUMULATIONS:
        raise UserError(f"--accumulation {given!r} is unknown: use one of {', '.join(ACCUMULATIONS)}")
    if given is not None:
        return given, "--accumulation given"
    if grad_accum == 1:
        return "plain", "one micro-batch per step: nothing to accumulate"
    return "gradcache", ("embeddings of every micro-batch cached, then recomputed with gradients: "
                         "the terms that compare samples span the whole global batch (GradCache)")
