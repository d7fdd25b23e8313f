"""The backbone registry, filled from the ``eatdist.backbones`` entry-point group (contract 2).

An entry point's name is a backbone name and loads to ``factory(**kwargs) -> nn.Module``. A
plugin may also serve a family: ``"<plugin>/<model>"`` calls the plugin's factory with
``model_name="<model>"`` (the built-in ``timm`` plugin serves every timm model this way, and a
bare timm model name such as ``"resnet50"`` is routed to it). Entry points are loaded lazily,
the first time a name is needed; one that fails to import is recorded with its name and
package and does not affect the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from torch import nn

from eatdist.errors import BackboneError, close_matches

GROUP = "eatdist.backbones"
TIMM_PLUGIN = "timm"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used: its entry-point name, package and the reason."""

    name: str
    package: str
    error: str

    def __str__(self) -> str:
        return f"backbone plugin '{self.name}' (package {self.package}) failed: {self.error}"


_factories: dict[str, Callable[..., nn.Module]] = {}
_failures: dict[str, PluginFailure] = {}


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _package(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value.split(":")[0]


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
    if TIMM_PLUGIN in _entry_points():
        import timm

        if timm.is_model(name):
            return TIMM_PLUGIN, {"model_name": name}
    return "", {}


def is_backbone(name: str) -> bool:
    """Return True when ``name`` resolves to a plugin (without building anything)."""
    return bool(_resolve(name)[0])


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
