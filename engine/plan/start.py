"""Part of the planner: the weights a run starts from (--init) and what of them stays fixed
(--lock, --unlock-last), with the parameter count that trains. The model and the source are
checked by engine/init_weights.py and engine/models/locking.py; the plan gets their findings."""
from dataclasses import dataclass

from engine.errors import UserError


@dataclass(frozen=True)
class StartFacts:
    """What prepare() found: the source's description and towers, and the trained parameters."""
    init: str | None = None                # InitSource.describe()
    init_towers: tuple[str, ...] = ()      # the towers --init provides
    trainable_params: int | None = None    # with --lock: the parameters left to train


def start_decisions(dials, facts: StartFacts, n_params: int):
    """(name, value, reason) for init, lock, unlock_last and trainable_params."""
    if dials.lock is None and dials.unlock_last:
        raise UserError(f"--unlock-last {dials.unlock_last} needs --lock image|text: it says how much of the "
                        f"locked tower still trains")
    if dials.lock is not None and dials.lock not in facts.init_towers:
        given = f"--init provides only the {' and '.join(facts.init_towers)} tower" if dials.init else "no --init"
        raise UserError(f"--lock {dials.lock} keeps the {dials.lock} tower as --init gives it, and {given}: give "
                        f"--init SOURCE with a {dials.lock} tower (an open_clip, Hugging Face or clipzero source), "
                        f"or drop --lock")
    yield "init", dials.init, facts.init or "--init given"
    if dials.lock is None:
        yield "lock", None, "every tower trains (--lock image|text keeps one as --init gave it)"
        yield "unlock_last", 0, "no tower locked"
        yield "trainable_params", n_params, "every parameter"
        return
    yield "lock", dials.lock, f"--lock given: the {dials.lock} tower keeps --init's weights"
    yield "unlock_last", dials.unlock_last, ("--unlock-last given: these last blocks of the locked tower, and what "
                                             "follows them, still train" if dials.unlock_last else
                                             "the whole tower locked, in eval mode")
    trainable = facts.trainable_params
    yield "trainable_params", trainable, (f"{trainable / 1e6:,.2f}M of {n_params / 1e6:,.2f}M: locked weights get no "
                                          f"gradients, fp32 master copy or optimizer states (model states below "
                                          f"count only these)")
