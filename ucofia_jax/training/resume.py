"""May this run continue that checkpoint? Checks on a resume, before any array is read.

A checkpoint's meta keeps the config it was written with (``checkpoints.py``); a resumed
run compares it with its own: a different model is refused (naming the keys and the
parameter paths whose shapes differ), and so are changed run settings (``RESUME_KEYS``: the
data order or the lr schedule would silently differ) unless the user allows them.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from typing import Any, Dict, Mapping, Sequence

import jax

from ucofia_jax.errors import ConfigError

# Keys whose change makes a resumed run silently differ from the run it continues (the data
# order or the lr schedule); refused unless config.train.allow_resume_with_changes.
RESUME_KEYS = (
    "seed",
    "train.batch_size",
    "train.epochs",
    "train.schedule",
    "data.dataset",
    "data.train_split",
    "data.expand_sentences",
)
# model.* keys that only say where the starting weights came from, or how memory is spent.
MODEL_KEYS_FREE = (
    "model.clip.checkpoint",
    "model.clip.from_scratch",
    "model.ucofia_checkpoint",
    "model.remat",
)


def config_dict(config) -> Dict[str, Any]:
    """The config as JSON values (tuples as lists), as a checkpoint's meta stores it."""
    return json.loads(config.to_json_best_effort())


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'train.batch_size': 32, ...} of a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def param_shapes(params) -> Dict[str, tuple]:
    """{'clip/visual/conv1/kernel': shape, ...} of a parameter tree (arrays or shapes)."""
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def shape_differences(saved: Mapping[str, tuple], ours: Mapping[str, tuple], shown: int = 6) -> str:
    """'' when two ``{path: shape}`` tables (:func:`param_shapes`) agree, else their differing
    parameters on one line, the first ``shown`` of them: 'p: saved S now A; ...; and N more'."""
    diff = [
        f"{p}: saved {saved.get(p, 'absent')} now {ours.get(p, 'absent')}"
        for p in sorted(set(saved) | set(ours))
        if saved.get(p) != ours.get(p)
    ]
    more = f"; and {len(diff) - shown} more" if len(diff) > shown else ""
    return "; ".join(diff[:shown]) + more


def check_resume(
    new_config: Mapping[str, Any],
    workdir: str,
    step: int,
    meta: Mapping[str, Any],
    saved_shapes: Mapping[str, tuple],
    params,
    *,
    allow_changes: bool = False,
) -> None:
    """Refuse (ConfigError) to resume checkpoint ``step`` of ``workdir`` under
    ``new_config`` (``config_dict``) if it was not made with it: different parameter shapes
    or model keys, or changed ``RESUME_KEYS`` unless ``allow_changes`` (then a warning)."""
    where = os.path.join(workdir, "checkpoints", str(step))
    saved = meta.get("config")
    if saved is None:  # a checkpoint from before configs were kept in it: the workdir's
        try:
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
    old, new = flat_keys(saved or {}), flat_keys(new_config)
    both = sorted(set(old) & set(new))  # a key added since is not a difference
    model_keys = [
        k for k in both if k.startswith("model.") and k not in MODEL_KEYS_FREE and old[k] != new[k]
    ]
    shape_diff = shape_differences(saved_shapes, param_shapes(params))

    def changes(keys):
        return ", ".join(f"config.{k} {old[k]!r} -> {new[k]!r}" for k in keys)

    if shape_diff:
        raise ConfigError(
            f"{where} was written by a different model ({changes(model_keys) or 'see shapes'}); "
            f"parameters: {shape_diff}. Use another --workdir, or the saved config's values."
        )
    run_keys = [k for k in RESUME_KEYS if k in old and k in new and old[k] != new[k]]
    changed = model_keys + run_keys
    if not changed:
        return
    if allow_changes:
        logging.warning("resuming %s with changed settings: %s", where, changes(changed))
        return
    raise ConfigError(
        f"{where} was written with other settings: {changes(changed)}. Resuming would silently "
        "change the data order or lr schedule; use another --workdir, the saved values, or "
        "--config.train.allow_resume_with_changes=True."
    )


def check_frozen(frozen: Sequence[str], params) -> None:
    """Every ``train.frozen`` entry must name a parameter (or a group of them) under clip/."""
    names = set()
    for path in param_shapes(params["clip"]):
        parts = path.split("/")
        names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for entry in frozen:
        if entry.strip("/") in names:
            continue
        near = difflib.get_close_matches(entry.strip("/"), sorted(names), n=3, cutoff=0.5)
        raise ConfigError(
            f"config.train.frozen: {entry!r} names no parameter under clip/"
            + (f" (nearest: {', '.join(near)})" if near else "")
        )
