"""Named choices of the config, one registry per kind: the single list of what a key may name.

Each :class:`Registry` belongs to one config key (e.g. ``DISTILL.LOSS``) and maps a name to its target: an
import path ``"package.module:attribute"`` that is imported only when :meth:`Registry.get` asks for it, or an
object registered directly. So ``clipkd.config`` can list and check names without importing torch or
open_clip, and the code that uses a value asks the same registry (no second list to keep in sync).

    >>> from clipkd.registry import LOSSES
    >>> LOSSES.names()
    ('ab', 'kl', 'rkl', 'js', 'skl', 'promptkd_kl')
    >>> LOSSES.get("kl")  # imports clipkd.losses.divergences now  # doctest: +SKIP
    <function kl_divergence ...>

This module imports nothing but :mod:`clipkd.errors`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from clipkd.errors import ConfigError

__all__ = ["Registry", "REGISTRIES", "STUDENTS", "LOSSES", "DIVERGENCES", "OBJECTIVES", "OPTIMIZERS", "TEMPLATES"]

_MISSING = object()


def _resolve(path: str) -> Any:
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"a registry target must look like 'package.module:attribute', got {path!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _source_tree(module: str) -> ast.Module | None:
    """The parsed source of ``module``, found without importing anything (not even its parent packages, whose
    ``__init__`` may import torch); None when there is no readable source file."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
        for part in parts[1:]:
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (ImportError, OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _source_arguments(path: str) -> tuple[str, ...] | None:
    """The argument names of the plain top-level ``def`` an import path names, read from its source file;
    None when that cannot be done (no source file, a decorated or nested target)."""
    module, _, attr = path.partition(":")
    tree = _source_tree(module)
    for node in tree.body if tree else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            if node.decorator_list:  # a decorator may change the signature: ask the object itself
                return None
            a = node.args
            names = [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs,
                     *([a.kwarg] if a.kwarg else [])]
            return tuple(x.arg for x in names)
    return None


def _source_class_attribute(path: str, attr: str) -> Any:
    """The literal value ``attr`` is given in the body of the top-level class an import path names, or of a base
    class defined in the same module or imported there by name (``from package.module import Base``), read from
    source files; _MISSING when that cannot be done (no source, not assigned there, not a literal)."""
    todo = [path]
    seen: set[str] = set()
    while todo:
        target = todo.pop(0)
        if target in seen:
            continue
        seen.add(target)
        module, _, name = target.partition(":")
        tree = _source_tree(module)
        body = tree.body if tree else ()
        node = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == name), None)
        if node is None:
            return _MISSING
        for stmt in node.body:
            if isinstance(stmt, ast.Assign):
                targets, value = stmt.targets, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, value = [stmt.target], stmt.value
            else:
                continue
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                try:
                    return ast.literal_eval(value)
                except ValueError:
                    return _MISSING
        imported = {a.asname or a.name: f"{n.module}:{a.name}" for n in body
                    if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 for a in n.names}
        for base in node.bases:
            if not isinstance(base, ast.Name):
                return _MISSING  # e.g. module.Base: ask the class itself
            if any(isinstance(n, ast.ClassDef) and n.name == base.id for n in body):
                todo.append(f"{module}:{base.id}")
            elif base.id in imported and imported[base.id].startswith("clipkd."):
                todo.append(imported[base.id])
            else:
                return _MISSING  # a base from elsewhere may set it: ask the class itself
    return _MISSING


class Registry:
    """Names a config key accepts, each with a lazily resolved target.

    A target is an import path ``"package.module:attribute"`` (resolved, then cached, on the first
    :meth:`get`) or any other object (returned as is): what the code that reads the key calls or builds, so
    that a name is its implementation and nothing branches on the string. A name registered with ``None``
    is accepted by the config but :meth:`get` refuses it (nothing builds it). Names keep their registration
    order, which is the order messages list them in.
    """

    def __init__(self, key: str, entries: Mapping[str, Any] | None = None,
                 declared: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.key = key
        self._targets: dict[str, Any] = {}
        self._resolved: dict[str, Any] = {}
        self._declared: dict[str, dict[str, Any]] = {}
        for name, target in (entries or {}).items():
            self.register(name, target, **(declared or {}).get(name, {}))

    def register(self, name: str, target: Any = _MISSING, **declared: Any) -> Any:
        """Add ``name``; without ``target``, a decorator that registers what it decorates and returns it.
        ``declared``: what the name declares beside its target, read without importing it (:meth:`declared`)."""
        if target is _MISSING:
            def decorator(obj: Any) -> Any:
                self.register(name, obj, **declared)
                return obj

            return decorator
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.key}: a registered name must be a non-empty string, got {name!r}")
        if name in self._targets:
            raise ValueError(f"{self.key}: {name!r} is registered already")
        self._targets[name] = target
        self._declared[name] = dict(declared)
        return target

    def names(self) -> tuple[str, ...]:
        """The accepted names, in registration order."""
        return tuple(self._targets)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._targets
        except TypeError:  # unhashable
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"Registry({self.key}: {', '.join(self._targets)})"

    def check(self, name: object) -> str:
        """``name`` if it is registered; otherwise ConfigError naming the key and the allowed names.

        Imports nothing, so the config can call it.
        """
        if name not in self:
            raise ConfigError(f"{self.key} must be one of {', '.join(self._targets)}; got {name!r}")
        assert isinstance(name, str)
        return name

    def arguments(self, name: object) -> tuple[str, ...]:
        """The argument names of ``name``'s target (a function), in order.

        Read from the source without importing it while its module is not imported yet, so the config can
        ask which settings a loss takes without importing torch (``clipkd config show``); otherwise, and
        for targets that are not a plain function in a source file, from the imported object itself.
        """
        key = self.check(name)
        target = self._targets[key]
        if isinstance(target, str) and key not in self._resolved and target.partition(":")[0] not in sys.modules:
            found = _source_arguments(target)
            if found is not None:
                return found
        return tuple(inspect.signature(self.get(key)).parameters)

    def entrypoint(self, name: object, method: str | None = None) -> Callable[..., Any]:
        """What builds ``name``: its target (or the target's ``method``, e.g. a student class's ``from_cfg``),
        which must be callable; a name registered without one is a ConfigError here, never a silent default."""
        target = self.get(name)
        fn = target if method is None else getattr(target, method, None)
        if not callable(fn):
            what = (f"{target!r} has no callable {method!r}" if method and target is not None
                    else f"its target is {target!r}")
            raise ConfigError(f"{self.key} {name!r} is registered but nothing builds it ({what}); register "
                              f"what implements it in clipkd.registry")
        return fn

    def attribute(self, name: object, attr: str, default: Any = _MISSING) -> Any:
        """What ``name``'s target (a class) declares as ``attr``, e.g. ``STUDENTS.attribute("ivlp",
        "own_text_tower")``.

        Read from the source without importing it while its module is not imported yet (so the config can ask
        what a student needs without importing torch), from the class body or its bases in the same module;
        otherwise, and for a value the source does not give as a literal there, from the imported class.
        """
        key = self.check(name)
        target = self._targets[key]
        if isinstance(target, str) and key not in self._resolved and target.partition(":")[0] not in sys.modules:
            found = _source_class_attribute(target, attr)
            if found is not _MISSING:
                return found
        if default is _MISSING:
            return getattr(self.get(key), attr)
        return getattr(self.get(key), attr, default)

    def declared(self, name: object, what: str) -> Any:
        """What ``name`` was registered with as ``what`` (e.g. an objective's ``check_config``), None when
        nothing: an import path ``"package.module:attribute"`` is imported now (it must not import torch where
        the config reads it), any other object is returned as is. Never imports the name's target."""
        value = self._declared[self.check(name)].get(what)
        return _resolve(value) if isinstance(value, str) else value

    def get(self, name: object) -> Any:
        """The target of ``name``, importing it on first use (ConfigError for an unknown name)."""
        key = self.check(name)
        if key not in self._resolved:
            target = self._targets[key]
            self._resolved[key] = _resolve(target) if isinstance(target, str) else target
        return self._resolved[key]


# ------------------------------------------------------------------------------------------------ registries
# Student classes: each builds itself (``from_cfg``) and declares what it needs (clipkd.models.student.Student).
STUDENTS = Registry("MODEL.STUDENT.TYPE", {
    "promptkd": "clipkd.models.student:PromptKDStudent",
    "ivlp": "clipkd.models.student:IVLPStudent",
    "promptsrc": "clipkd.models.promptsrc:PromptSRCStudent",
    "coop": "clipkd.models.coop:CoOpStudent",
    "kgcoop": "clipkd.models.coop:KgCoOpStudent",
    "vpt": "clipkd.models.vpt:VPTStudent",
    "cocoop": "clipkd.models.cocoop:CoCoOpStudent",
    "maple": "clipkd.models.maple:MaPLeStudent",
})

LOSSES = Registry("DISTILL.LOSS", {
    "ab": "clipkd.losses.divergences:alpha_beta_divergence",
    "kl": "clipkd.losses.divergences:kl_divergence",
    "rkl": "clipkd.losses.divergences:reverse_kl",
    "js": "clipkd.losses.divergences:js_divergence",
    "skl": "clipkd.losses.divergences:symmetric_kl",
    "promptkd_kl": "clipkd.losses.divergences:promptkd_kl",
    # methods: a transform of the logits around a divergence (DISTILL.DIVERGENCE), or correlations (dist)
    "dkd": "clipkd.losses.methods:dkd_loss",
    "lsd": "clipkd.losses.methods:lsd_loss",
    "ttm": "clipkd.losses.methods:ttm_loss",
    "dist": "clipkd.losses.methods:dist_loss",
})

# The divergences a method (dkd, lsd, ttm) can use inside (DISTILL.DIVERGENCE); each also a DISTILL.LOSS.
DIVERGENCES = Registry("DISTILL.DIVERGENCE", {
    name: LOSSES._targets[name] for name in ("kl", "ab", "rkl", "js", "skl")
})

# Builders (cfg, student, classnames) -> objective: what a training step's loss is (clipkd.methods.distiller).
# Each declares check_config: cfg -> None, the settings it cannot train with (ConfigError), torch-free, which
# clipkd.config.check_config (clipkd train, clipkd config show) runs.
OBJECTIVES = Registry("DISTILL.OBJECTIVE", {
    "kd": "clipkd.methods.kd:build_kd_objective",
    "promptsrc": "clipkd.methods.promptsrc:build_promptsrc_objective",
    "kgcoop": "clipkd.methods.kgcoop:build_kgcoop_objective",
}, declared={
    "kd": {"check_config": "clipkd.config.checks:check_kd_config"},
    "promptsrc": {"check_config": "clipkd.config.checks:check_promptsrc_config"},
    "kgcoop": {"check_config": "clipkd.config.checks:check_kgcoop_config"},
})

OPTIMIZERS = Registry("OPTIM.NAME", {
    "sgd": "torch.optim:SGD",
    "adamw": "torch.optim:AdamW",
})

# Functions (cfg, template) -> the zero-shot templates: "dataset": the dataset's own template (the one the
# caller passes, else DATASET.NAME's); "ensemble": CLIP's 80 ImageNet templates; "photo": "a photo of a {}."
# whatever the dataset (KDPL-CA's teacher prompt: a dataset's template would name its domain).
TEMPLATES = Registry("MODEL.TEACHER.TEMPLATES", {
    "dataset": "clipkd.models.teacher:dataset_templates",
    "ensemble": "clipkd.models.teacher:ensemble_templates",
    "photo": "clipkd.models.teacher:photo_template",
})

# config key -> its registry; clipkd.config.defaults.CHOICES reads the names from here.
REGISTRIES: dict[str, Registry] = {r.key: r for r in (TEMPLATES, STUDENTS, LOSSES, DIVERGENCES, OBJECTIVES,
                                                      OPTIMIZERS)}
