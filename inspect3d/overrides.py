"""``key=value`` arguments over a YAML config, for the commands that are not Hydra tasks.

watch, simulate, report, review and dataset read their options this way (OmegaConf, no Hydra
run folders; ``model``/``data`` would collide with Hydra's config groups). A typo in a key is an
error that names the closest valid key and lists the valid ones. ``flat_keys`` and
``did_you_mean`` also serve the Hydra commands (``inspect3d.cli``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from inspect3d.errors import InspectError


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every key of a nested config as a dotted path (``policy.k``), parents included."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # unresolved: a missing ``???`` value is still a key
        cfg = OmegaConf.to_container(cfg, resolve=False)
    out: list[str] = []
    for key, value in cfg.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            out += flat_keys(value, f"{prefix}{key}.")
    return out


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'trainer.epochs'?)"`` for the valid key closest to ``key``, or ``""``."""
    valid = list(valid)
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not match:  # a typo in the last part only: compare the leaves under the same parent
        parent, _, leaf = key.rpartition(".")
        leaves = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == parent}
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        match = [leaves[near[0]]] if near else []
    return f" (did you mean {match[0]!r}?)" if match else ""


def merge_overrides(base: Any, args: list[str], command: str, usage: str = "") -> dict:
    """``base`` (an OmegaConf mapping) with ``args`` merged in, resolved to plain Python values."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    hint = f" ({usage})" if usage else ""
    bad = [a for a in args if "=" not in a or a.startswith("-")]
    if bad:
        raise InspectError(f"bad argument(s) {bad} for `inspect3d {command}`: use key=value{hint}")
    OmegaConf.set_struct(base, True)  # a typo in a key is an error, not a new key
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(args))
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        msg = _describe(exc, args, flat_keys(base))
        valid = f"valid keys: {sorted(base)}{hint}"
        raise InspectError(f"`inspect3d {command}`: {msg}; {valid}") from exc


def _describe(exc: Exception, args: list[str], valid: list[str]) -> str:
    """OmegaConf's first line, or for an unknown key: the key as typed and the closest one."""
    full_key = getattr(exc, "full_key", None)
    typed = [k for k in (a.split("=", 1)[0] for a in args) if full_key and _under(k, full_key)]
    if not typed or full_key in valid:
        return str(exc).splitlines()[0]
    return f"no key {typed[0]!r}{did_you_mean(typed[0], valid)}"


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")
