"""May this run continue that checkpoint? Checks on a resume, before any array is read.

A checkpoint's meta keeps the config it was written with (``checkpoints.py``); a resumed
run compares it with its own, key by key, and the saved state's tree (paths and shapes, from
the checkpoint's metadata) with the one its config makes:

* refused always: another ``train.optimizer`` (its moments mean something else), or a state
  of another structure (the parameters' shapes: another model, ``data.max_frames``; or the
  optimizer state's tree: ``train.frozen``, a clip or a decay switched on or off); the
  message names the keys and the differing paths;
* refused unless ``config.train.allow_resume_with_changes``: other ``model.*`` keys (but
  ``MODEL_KEYS_FREE``), the run settings of ``RESUME_KEYS`` and every ``data.*`` key but
  ``DATA_KEYS_FREE`` (the model, the examples, the data order or the lr schedule would
  silently differ from the run it continues);
* any other change (``train.lr``, ``train.clip_lr``, ``train.warmup_proportion``, ...) is
  allowed and said on one line: ``config.train.lr 0.001 -> 0.002``.

``main`` runs the check twice: on the newest checkpoint's metadata before any dataset is
built or anything compiled (:func:`check_resume` with the whole state's shapes), and again
on the checkpoint actually restored (with the params' shapes, silently), which may be an
earlier one when the newest is damaged.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax

from ucofia_jax.errors import ConfigError

# Keys whose change makes a resumed run silently differ from the run it continues (the data
# order or the lr schedule); refused unless config.train.allow_resume_with_changes.
RESUME_KEYS = (
    "seed",
    "train.batch_size",
    "train.epochs",
    "train.schedule",
)
# model.* keys that only say where the starting weights came from, or how memory is spent.
MODEL_KEYS_FREE = (
    "model.clip.checkpoint",
    "model.clip.from_scratch",
    "model.ucofia_checkpoint",
    "model.remat",
)
# Keys that change the meaning of the saved state whatever its tree: refused always.
STATE_KEYS = ("train.optimizer",)
# data.* keys that say where the same examples are or how fast they are read (or what is
# evaluated); every other data.* key changes the examples (data.max_frames, image_size, ...).
DATA_KEYS_FREE = (
    "data.data_dir",
    "data.manual_dir",
    "data.prefetch",
    "data.num_parallel_calls",
    "data.eval_split",
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


def path_name(keys) -> str:
    """'params/clip/visual/conv1/kernel', 'opt_state/1/inner_states/clip/...' of a tree path
    (dict keys, sequence indices and namedtuple fields alike; Orbax's metadata tree names
    a namedtuple's fields as dict keys)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def tree_shapes(tree) -> Dict[str, tuple]:
    """{'clip/visual/conv1/kernel': shape, ...} of a tree of arrays or shapes."""
    return {
        path_name(path): tuple(x.shape)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(x, "shape")
    }


def shape_differences(saved: Mapping[str, tuple], ours: Mapping[str, tuple], shown: int = 6) -> str:
    """'' when two ``{path: shape}`` tables (:func:`tree_shapes`) agree, else their differing
    parameters on one line, the first ``shown`` of them (a state's params before its optimizer
    state): 'p: saved S now A; ...; and N more'."""
    diff = [
        f"{p}: saved {saved.get(p, 'absent')} now {ours.get(p, 'absent')}"
        for p in sorted(set(saved) | set(ours), key=lambda p: (not p.startswith("params/"), p))
        if saved.get(p) != ours.get(p)
    ]
    more = f"; and {len(diff) - shown} more" if len(diff) > shown else ""
    return "; ".join(diff[:shown]) + more


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    both = sorted(set(old) & set(new))  # a key added since is not a difference
    return [k for k in both if old[k] != new[k]]


def saved_config(workdir: str, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The config a checkpoint was written with: its meta's, else (a checkpoint from before
    configs were kept in it) the workdir's config.json, else {}."""
    saved = meta.get("config")
    if saved is None:
        try:
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
    return saved or {}


def check_resume(
    new_config: Mapping[str, Any],
    workdir: str,
    step: int,
    meta: Mapping[str, Any],
    saved_shapes: Mapping[str, tuple],
    shapes: Mapping[str, tuple],
    *,
    allow_changes: bool = False,
    announce: Optional[Callable[[str], None]] = None,
) -> None:
    """Refuse (ConfigError) to resume checkpoint ``step`` of ``workdir`` under
    ``new_config`` (``config_dict``) if it was not made with it (module docstring).
    ``saved_shapes`` / ``shapes``: ``{path: shape}`` of the saved and of this run's state
    (or of their params alone). The changes it allows go to ``announce`` as one line."""
    where = os.path.join(workdir, "checkpoints", str(step))
    old, new = flat_keys(saved_config(workdir, meta)), flat_keys(new_config)
    changed = _changed(old, new)
    state_keys = [k for k in changed if k in STATE_KEYS]
    model_keys = [k for k in changed if k.startswith("model.") and k not in MODEL_KEYS_FREE]
    data_keys = [k for k in changed if k.startswith("data.") and k not in DATA_KEYS_FREE]
    run_keys = [k for k in RESUME_KEYS if k in changed]
    shape_diff = shape_differences(saved_shapes, shapes)

    def changes(keys):
        return ", ".join(f"config.{k} {old[k]!r} -> {new[k]!r}" for k in keys)

    if shape_diff or state_keys:
        # Which keys made the state differ: the optimizer, the model's and the data's (the
        # frame and word counts size parameters), else the train.* keys that changed
        # (frozen, a clip or a decay of 0, ...).
        culprits = state_keys + model_keys + data_keys or [
            k for k in changed if k.startswith("train.")
        ]
        differs = f"; its state differs: {shape_diff}" if shape_diff else ""
        raise ConfigError(
            f"{where} was written with another model or optimizer "
            f"({changes(culprits) or 'no config key differs'}){differs}. Use another "
            "--workdir, or the saved config's values."
        )
    held = model_keys + data_keys + run_keys
    if held and not allow_changes:
        raise ConfigError(
            f"{where} was written with other settings: {changes(held)}. Resuming would "
            "silently change the model, the examples, the data order or the lr schedule; use "
            "another --workdir, the saved values, or "
            "--config.train.allow_resume_with_changes=True."
        )
    if announce is not None and changed:
        announce(f"resuming {where} with changed settings: {changes(changed)}")


def check_frozen(frozen: Sequence[str], params) -> None:
    """Every ``train.frozen`` entry must name a parameter (or a group of them) under clip/."""
    names = set()
    for path in tree_shapes(params["clip"]):
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
