"""One lookup per method: everything the engine needs to know about a method for one model.

    method = lookup("declip", "vit-b-32")
    method.objective    # the Objective class (engine/objectives/declip.py)
    method.recipe       # its paper's numbers for these towers (engine/objectives/recipes.py)
    method.preset       # the towers as the objective builds them (its adapt_preset)
    method.data         # what each sample must carry (engine/data/spec.py)
    method.lr_groups    # parameter groups with their own learning rates

engine/training_run.py looks the method up once in `prepare()` and hands the bundle to the planner,
the model and the loader; engine/eval/load_run.py does the same for a run's saved plan. Nothing
else outside engine/objectives/ asks the registry.
"""
from dataclasses import dataclass, replace

from engine.data.spec import DataSpec
from engine.errors import UserError
from engine.models.presets import DEBUG_PRESETS, ModelPreset, get_preset
from engine.objectives.base import Objective, Option
from engine.objectives.recipes import Recipe, with_device_fit
from engine.objectives.registry import objective_class


@dataclass(frozen=True)
class Method:
    name: str                  # as given: a registered name or package.module:Class
    objective: type[Objective]
    recipe: Recipe
    preset: ModelPreset

    @property
    def data(self) -> DataSpec:
        """What the loader must yield for this objective, with the recipe's crop scale."""
        cls = self.objective
        return DataSpec(image_views=cls.image_views, augment=cls.augment, crop_scale=self.recipe.crop_scale,
                        text_aug=cls.text_aug, mlm=cls.mlm, strip_punctuation=cls.strip_punctuation)

    @property
    def options(self) -> tuple[Option, ...]:
        """The options the objective declares (dials and decisions)."""
        return self.objective.options

    @property
    def dialled_options(self) -> frozenset[str]:
        """The names of the options a user may set on the command line."""
        return frozenset(option.name for option in self.objective.options if option.dial)

    @property
    def lr_groups(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return self.objective.lr_groups

    def build_objective(self, model, options: dict, seed: int) -> Objective:
        """The objective with the options the plan resolved for it (`model`: the TwoTower)."""
        return self.objective.from_plan(model, options, seed)


def lookup(method: str, model: str, text_layers: int | None = None) -> Method:
    """The method `method` names, for the towers of `model` (a preset name or any timm image
    tower); `text_layers` overrides the text tower's depth. Raises UserError naming the valid
    methods or models."""
    cls = objective_class(method)
    base = get_preset(model)
    recipe = cls.recipe(model, base, smoke=model in DEBUG_PRESETS)
    preset = cls.adapt_preset(base)
    if text_layers is not None:
        if text_layers < 1:
            raise UserError(f"--text-layers {text_layers}: give a positive number of layers")
        preset = replace(preset, text_layers=text_layers)
    return Method(method, cls, with_device_fit(recipe, method, model), preset)
