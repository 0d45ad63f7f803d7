"""The YAML recipe (docs/recipe.md): loading with line numbers, schema, model references, parameter
values and layer positions, phase-A validation, and the validated ``Recipe``."""

from mergekit_like.recipe.model import InputModel, Recipe
from mergekit_like.recipe.params import (NO_VALUE, Conditional, CondEntry, Gradient, Scalar,
                                         Setting, Steps, Structured, config_num_layers, evaluate,
                                         interpolate, layer_index, layer_positions, layer_stacks,
                                         parse_setting, step_value)
from mergekit_like.recipe.refs import ModelRef, is_valid_repo_id, parse_ref, parse_ref_string
from mergekit_like.recipe.validate import build_recipe, load_recipe, load_recipe_text
from mergekit_like.recipe.yaml_lines import Locator, dotted, load_yaml

__all__ = [
    "NO_VALUE", "CondEntry", "Conditional", "Gradient", "InputModel", "Locator", "ModelRef",
    "Recipe", "Scalar", "Setting", "Steps", "Structured", "build_recipe", "config_num_layers",
    "dotted", "evaluate", "interpolate", "is_valid_repo_id", "layer_index", "layer_positions",
    "layer_stacks", "load_recipe", "load_recipe_text", "load_yaml", "parse_ref",
    "parse_ref_string", "parse_setting", "step_value",
]
