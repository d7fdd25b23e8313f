"""The backbone registry, filled from the ``eatdist.backbones`` entry-point group (contract 2).

An entry point's name is a backbone name and loads to ``factory(**kwargs) -> nn.Module``. A
plugin may also serve a family: ``"<plugin>/<model>"`` calls the plugin's factory with
``model_name="<model>"`` (the built-in ``timm`` plugin serves every timm model this way, and a
bare timm model name such as ``"resnet50"`` or a Hub name ``"hf-hub:org/name"`` is routed to
it). Entry points are loaded lazily, the first time a name is needed; one that fails to import
is recorded with its name and package and does not affect the others.

When two installed packages register the same name, one wins, the same one whatever the install
order or ``sys.path``: eatdist's own entry point first, else the package whose normalised name
sorts first (then the lower version). The clash is reported (:func:`name_clashes`, ``eatdist
backbones``), naming both packages. :func:`check_plugins` builds every plugin on a tiny input
and checks it against the contract (``eatdist backbones --check``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch
from torch import nn

from eatdist.errors import BackboneError, close_matches

GROUP = "eatdist.backbones"
TIMM_PLUGIN = "timm"
HF_HUB_PREFIX = "hf-hub:"
OWN_PACKAGE = "eatdist"
# The model ``check_plugins`` builds from a plugin that serves a family rather than one model.
CHECK_MODEL: dict[str, str] = {TIMM_PLUGIN: "test_resnet"}
CHECK_IMAGE_SIZE = 64


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used: its entry-point name, package and the reason."""

    name: str
    package: str
    error: str

    def __str__(self) -> str:
        return f"backbone plugin '{self.name}' (package {self.package}) failed: {self.error}"


@dataclass(frozen=True)
class NameClash:
    """One backbone name registered by several packages: the one used and the ones hidden."""

    name: str
    used: str
    hidden: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"backbone '{self.name}' is registered by {len(self.hidden) + 1} packages: {self.used} is used, "
            f"{', '.join(self.hidden)} hidden (eatdist's own first, else the package name sorting first)"
        )


@dataclass(frozen=True)
class PluginCheck:
    """The result of building one plugin backbone on a tiny input (:func:`check_plugins`)."""

    name: str
    package: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        status = "ok" if self.ok else "violates the backbone contract"
        return f"backbone plugin '{self.name}' (package {self.package}): {status}: {self.detail}"


_factories: dict[str, Callable[..., nn.Module]] = {}
_failures: dict[str, PluginFailure] = {}


def _package(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value.split(":")[0]


def _precedence(ep: EntryPoint) -> tuple[int, str, str, str]:
    """Sort key of entry points sharing a name: the first one wins (see the module docstring)."""
    dist = getattr(ep, "dist", None)
    name = re.sub(r"[-_.]+", "-", dist.name).lower() if dist is not None else ""
    version = dist.version if dist is not None else ""
    return (0 if name == OWN_PACKAGE else 1, name, version, ep.value)


def _grouped() -> dict[str, list[EntryPoint]]:
    """Every entry point of the group by name, the winner of each name first."""
    groups: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        groups.setdefault(ep.name, []).append(ep)
    return {name: sorted(eps, key=_precedence) for name, eps in groups.items()}


def _entry_points() -> dict[str, EntryPoint]:
    return {name: eps[0] for name, eps in _grouped().items()}


def name_clashes() -> list[NameClash]:
    """Return the backbone names that several installed packages register, sorted by name."""
    clashes = []
    for name, eps in sorted(_grouped().items()):
        packages = list(dict.fromkeys(_package(ep) for ep in eps))
        if len(packages) > 1:
            clashes.append(NameClash(name, packages[0], tuple(packages[1:])))
    return clashes


def _load(name: str) -> Callable[..., nn.Module] | None:
    if name in _factories:
        return _factories[name]
    if name in _failures:
        return None
    ep = _entry_points().get(name)
    if ep is None:
        return None
    try:
        factory = ep.load()
        if not callable(factory):
            raise TypeError(f"entry point {ep.value} is not callable")
    except Exception as exc:  # a broken plugin must not take the others down
        _failures[name] = PluginFailure(name, _package(ep), f"{type(exc).__name__}: {exc}")
        return None
    _factories[name] = factory
    return factory


def reset_registry() -> None:
    """Forget loaded plugins, so newly installed ones are seen (mainly for tests)."""
    _factories.clear()
    _failures.clear()


def list_backbones(load: bool = False) -> list[str]:
    """Return the registered plugin names (entry points), sorted.

    With ``load``, each is imported and those that fail are left out (see :func:`load_failures`).
    Timm models are served through the ``timm`` plugin: see :func:`list_timm_models`.
    """
    names = sorted(_entry_points())
    if load:
        names = [n for n in names if _load(n) is not None]
    return names


def load_failures() -> list[PluginFailure]:
    """Return the plugins that failed to load so far (call ``list_backbones(load=True)`` first)."""
    return list(_failures.values())


def list_timm_models(pattern: str = "*") -> list[str]:
    """Return the timm model names matching ``pattern`` (all usable as backbone names)."""
    import timm

    return list(timm.list_models(pattern))


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    """Map a backbone name to (plugin name, extra factory kwargs)."""
    if name in _entry_points():
        return name, {}
    plugin, sep, model = name.partition("/")
    if sep and plugin in _entry_points():
        return plugin, {"model_name": model}
    if name.startswith(HF_HUB_PREFIX) and TIMM_PLUGIN in _entry_points():
        return TIMM_PLUGIN, {"model_name": name}  # timm reads the architecture from the repository
    if TIMM_PLUGIN in _entry_points():
        import timm

        if timm.is_model(name):
            return TIMM_PLUGIN, {"model_name": name}
    return "", {}


def is_backbone(name: str) -> bool:
    """Return True when ``name`` resolves to a plugin (without building anything)."""
    return bool(_resolve(name)[0])


def backbone_provider(name: str) -> tuple[str, str] | None:
    """Return (plugin name, "package version") of the plugin serving backbone ``name``, or None if none does."""
    plugin = _resolve(name)[0]
    if not plugin:
        return None
    return plugin, _package(_entry_points()[plugin])


def check_backbone(module: Any, name: str) -> nn.Module:
    """Check a built backbone against contract 2 and return it.

    Raises:
        BackboneError: naming the backbone and the missing or wrong attribute.
    """
    if not isinstance(module, nn.Module):
        raise BackboneError(f"backbone '{name}': factory returned {type(module).__name__}, not a torch.nn.Module")
    nf = getattr(module, "num_features", None)
    if not isinstance(nf, int) or isinstance(nf, bool) or nf <= 0:
        raise BackboneError(f"backbone '{name}': needs a positive int attribute 'num_features', has {nf!r}")
    if not callable(getattr(module, "forward_features", None)):
        raise BackboneError(f"backbone '{name}': needs a method 'forward_features(x)'")
    prefix = getattr(module, "num_prefix_tokens", 0)
    if not isinstance(prefix, int) or prefix < 0:
        raise BackboneError(f"backbone '{name}': 'num_prefix_tokens' must be a non-negative int, has {prefix!r}")
    return module


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with ``kwargs`` and check it against contract 2.

    Raises:
        BackboneError: for an unknown name (with close matches), a plugin that failed to load,
            a factory that raised, or a module that breaks the contract.
    """
    plugin, extra = _resolve(name)
    if not plugin:
        candidates = list(_entry_points())
        try:
            candidates += list_timm_models()
        except ImportError:
            pass
        raise BackboneError(
            f"unknown backbone '{name}'{close_matches(name, candidates)}; run 'eatdist backbones' to list them"
        )
    factory = _load(plugin)
    if factory is None:
        raise BackboneError(str(_failures[plugin]))
    try:
        module = factory(**extra, **kwargs)
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"backbone '{name}' (plugin '{plugin}'): factory failed: {type(exc).__name__}: {exc}"
        ) from exc
    return check_backbone(module, name)


def _check_one(name: str, ep: EntryPoint) -> PluginCheck:
    """Build plugin ``name`` and run a tiny batch through the model's own feature path."""
    from eatdist.models.eat import EATModel  # eat imports nothing from here

    label = f"{name}/{CHECK_MODEL[name]}" if name in CHECK_MODEL else name
    size = CHECK_IMAGE_SIZE
    try:
        module = create_backbone(label)
        input_size = (getattr(module, "pretrained_cfg", None) or {}).get("input_size")
        if input_size and not hasattr(module, "patch_embed"):  # a CNN runs at any size; a ViT at its own
            input_size = None
        size = int(input_size[-1]) if input_size else CHECK_IMAGE_SIZE
        model = EATModel(module, 2, 2, backbone_name=label).eval()
        with torch.no_grad():
            features = model.feature_map(torch.randn(2, 3, size, size))
        if features.shape[0] != 2:
            raise BackboneError(f"backbone '{label}': forward_features turned a batch of 2 into {features.shape[0]}")
    except BackboneError as exc:
        return PluginCheck(name, _package(ep), False, str(exc))
    except Exception as exc:  # whatever a broken plugin raises is a finding, not a crash of the check
        detail = f"backbone '{label}' failed on a batch of {size}-px images: {type(exc).__name__}: {exc}"
        return PluginCheck(name, _package(ep), False, detail)
    grid = "x".join(str(d) for d in features.shape[2:])
    return PluginCheck(name, _package(ep), True, f"{label} gives {model.num_features} features on a {grid} grid")


def check_plugins() -> list[PluginCheck]:
    """Build each registered plugin backbone on a tiny batch and check it against contract 2.

    The timm plugin is checked with ``timm/test_resnet``. The contract: a ``torch.nn.Module``
    with a positive int ``num_features`` whose ``forward_features`` gives a map ``[B, C, H, W]``
    or tokens ``[B, N, C]`` forming a grid, for the same batch size B. Plugins that fail to load
    are left out (see :func:`load_failures`). Returns one result per plugin, sorted by name;
    nothing is raised for a broken plugin.
    """
    return [_check_one(name, ep) for name, ep in sorted(_entry_points().items()) if _load(name) is not None]
