"""Every merge method a recipe may name, as one explicit list (the way mergekit's registry lists
its configured methods). A new method is one line here.

The registry sits above the method packages because it imports them all: the static adapters of
``methods/`` and the data-driven packages ``twin/``, ``wemoe/``, ``rcp/``, ``regmean/`` and
``fisher/``. Nothing below it
imports it; the recipe validator and the engine receive the table instead
(``method_table()``, ``load_recipe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_like.io.verify import VerifyReport, verify_output
from mergekit_like.methods.arcee_fusion import ArceeFusion
from mergekit_like.methods.base import Method
from mergekit_like.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from mergekit_like.methods.dare import DareLinear, DareTies
from mergekit_like.methods.della import Della, DellaLinear
from mergekit_like.fisher.method import Fisher
from mergekit_like.methods.karcher import Karcher
from mergekit_like.methods.linear import Linear
from mergekit_like.methods.model_stock import ModelStock
from mergekit_like.methods.multislerp import MultiSlerp
from mergekit_like.methods.nearswap import Nearswap
from mergekit_like.methods.nuslerp import NuSlerp
from mergekit_like.methods.passthrough import Passthrough
from mergekit_like.methods.ram import Ram, RamPlusTL
from mergekit_like.methods.sce import Sce
from mergekit_like.methods.slerp import Slerp
from mergekit_like.methods.task_arithmetic import TaskArithmetic
from mergekit_like.methods.ties import Ties
from mergekit_like.rcp.approx import RCPApprox
from mergekit_like.rcp.method import RCP
from mergekit_like.recipe import Recipe
from mergekit_like.regmean.method import RegMean
from mergekit_like.recipe import load_recipe as _load_recipe
from mergekit_like.recipe import load_recipe_text as _load_recipe_text
from mergekit_like.twin.method import Twin
from mergekit_like.wemoe.method import WEMoE

METHODS: tuple[Method, ...] = (
    # mergekit's methods
    Linear(), Slerp(), NuSlerp(), MultiSlerp(), Karcher(), Passthrough(), Nearswap(),
    ArceeFusion(), ModelStock(),
    TaskArithmetic(), Ties(), DareTies(), DareLinear(), Breadcrumbs(), BreadcrumbsTies(),
    Della(), DellaLinear(), Sce(), Ram(), RamPlusTL(),
    # data-driven methods (each its own package)
    Twin(), WEMoE(), RCP(), RCPApprox(), RegMean(), Fisher(),
)
"""Implemented methods, in the order lists and messages show them."""

PLANNED: tuple[str, ...] = ()
"""Names mergekit has that are not implemented yet: recognised, refused clearly."""

REGISTRY: dict[str, Method] = {m.spec.name: m for m in METHODS}


def get_method(name: str) -> Method | None:
    return REGISTRY.get(name)


def method_names() -> list[str]:
    """Implemented methods, in display order."""
    return list(REGISTRY)


def method_table() -> dict[str, Method | None]:
    """What the recipe validator is given: every implemented method, then every planned name
    (None: known, not implemented yet), in display order."""
    return {**REGISTRY, **{name: None for name in PLANNED if name not in REGISTRY}}


def load_recipe(path: str | Path, **kw: Any) -> Recipe:
    """``recipe.load_recipe`` with this registry's methods."""
    return _load_recipe(path, methods=method_table(), **kw)


def load_recipe_text(text: str, display: str = "recipe.yml", **kw: Any) -> Recipe:
    """``recipe.load_recipe_text`` with this registry's methods."""
    return _load_recipe_text(text, display, methods=method_table(), **kw)


def verify(folder: str | Path, **kw: Any) -> VerifyReport:
    """``io.verify.verify_output`` with every method's own checks of what it adds to an output
    (a Twin bundle's factors and router)."""
    return verify_output(Path(folder), checks=[m.check_output for m in METHODS],
                         ignore=tuple(d for m in METHODS for d in m.output_folders), **kw)
