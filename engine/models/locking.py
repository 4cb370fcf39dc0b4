"""--lock image|text: a tower kept as --init gave it (LiT locks the image tower), optionally with
its last N blocks, and what follows them, still trained (--unlock-last N).

A locked parameter has requires_grad False: it gets no gradient, the optimizer's parameter groups
leave it out (engine/train/optim.py), so DeepSpeed keeps no fp32 master copy or Adam states for
it, and the plan counts only the trained parameters in the model states. A wholly locked tower
also stays in eval mode (TwoTower.train), so that batch-norm statistics and dropout leave it as
it was, as open_clip's --lock-image does with its BatchNorm statistics.
"""
from __future__ import annotations

from torch import nn

TOWERS = ("image", "text")


def tower_blocks(tower: nn.Module, which: str) -> tuple[nn.Module, list[nn.Module]] | None:
    """(the tower, its transformer blocks in order), or None when it has no such blocks (a ResNet)."""
    if which == "image":
        blocks = getattr(tower.trunk, "blocks", None)
        return (tower, list(blocks)) if isinstance(blocks, nn.Sequential | nn.ModuleList) else None
    model = tower.transformer
    encoder = model.text_model.encoder if hasattr(model, "text_model") else model.encoder
    return tower, list(encoder.layers if hasattr(encoder, "layers") else encoder.layer)


def unlock_problem(model: nn.Module, which: str, unlock_last: int) -> str | None:
    """Why --unlock-last N cannot apply to this tower, or None."""
    if unlock_last < 0:
        return f"--unlock-last {unlock_last} must be 0 or more"
    if unlock_last == 0:
        return None
    found = tower_blocks(getattr(model, which), which)
    if found is None:
        return (f"--unlock-last counts transformer blocks and this {which} tower ("
                f"{type(getattr(model, which).trunk).__name__}) has none: lock it whole (drop --unlock-last)")
    if unlock_last > len(found[1]):
        return f"--unlock-last {unlock_last}: the {which} tower has {len(found[1])} blocks"
    return None


def lock(model: nn.Module, which: str, unlock_last: int = 0) -> None:
    """Freeze `which` tower of a TwoTower, except its last `unlock_last` blocks and every
    parameter registered after them (the final norm, the pooler, the projection)."""
    tower = getattr(model, which)
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    if unlock_last:
        _, blocks = tower_blocks(tower, which)
        trained = {id(p) for block in blocks[-unlock_last:] for p in block.parameters()}
        after = False
        for parameter in tower.parameters():  # registration order: embeddings, blocks, final norm, projection
            after = after or id(parameter) in trained
            parameter.requires_grad_(after)
    else:
        model.locked_towers = (*model.locked_towers, which)
        tower.eval()


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
