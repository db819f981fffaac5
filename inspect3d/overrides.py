"""``key=value`` arguments over a YAML config, for the commands that are not Hydra tasks.

watch, simulate, report, review and dataset read their options this way (OmegaConf, no Hydra
run folders; ``model``/``data`` would collide with Hydra's config groups). A typo in a key is an
error that lists the valid keys.
"""

from __future__ import annotations

from typing import Any

from inspect3d.errors import InspectError


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
        msg = str(exc).splitlines()[0]
        raise InspectError(
            f"`inspect3d {command}`: {msg}; valid keys: {sorted(base)}{hint}"
        ) from exc
