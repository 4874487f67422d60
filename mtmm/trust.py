"""What a config that comes from outside (the one stored in a checkpoint, or a run folder's config.yaml) may make
mtmm do: build mtmm's own components, nothing else.

Hydra's `instantiate` calls whatever `_target_` names, with whatever arguments the config gives, so a config read
from a file someone else wrote is code. Before anything is built from it, `trusted_config` checks it:
- every `_target_`, at any depth (inside arguments, `_args_` and lists too), is one of the builders that mtmm's own
  `conf/` uses (the allow-list is read from the package, not written by hand), or one the user names on the command
  line with `trusted_targets=[mypkg.builders.MyEncoder, otherpkg.]` (an entry ending in '.' allows a whole module);
- no value holds a `${...}` interpolation: checkpoints store their config resolved, and a resolver such as
  `oc.env` would read the evaluating user's environment;
- the keys that choose where files are written (the dataset, image and feature caches) are replaced by the
  evaluating user's own settings (see `use_own_cache_dirs`).
"""

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from mtmm.errors import UserError

# The keys of a training config that name folders mtmm writes to. A loaded config never chooses them.
CACHE_KEYS = ("data.source.cache_dir", "data.image_cache_dir", "trainer.feature_cache_dir")


@lru_cache(maxsize=1)
def shipped_targets() -> frozenset[str]:
    """Every `_target_` named in the package's own config files (mtmm.conf): mtmm's builders."""
    found = set()

    def collect(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str):
                    found.add(value)
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    def walk(folder) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry)
            elif entry.name.endswith(".yaml"):
                collect(yaml.safe_load(entry.read_text(encoding="utf-8")))

    walk(resources.files("mtmm.conf"))
    return frozenset(found)


def allowed(target: str, trusted: tuple[str, ...]) -> bool:
    if target in shipped_targets():
        return True
    return any(target == entry or (entry.endswith(".") and target.startswith(entry)) for entry in trusted)


def trusted_config(text: str, source: str, trusted: tuple[str, ...] | list[str] = ()) -> DictConfig:
    """The YAML `text` of a config read from `source` (a checkpoint or file someone else may have written), checked
    as the module docstring says; anything else stops with one line naming the key and the value."""
    trusted = tuple(str(entry) for entry in trusted or ())
    if not isinstance(text, str):
        raise UserError(f"{source}: its config is not YAML text")
    try:
        # OmegaConf's loader is YAML's safe loader: plain data, no tags that build Python objects. Interpolations
        # are evaluated only when read, and nothing below reads one.
        loaded = OmegaConf.create(text)
    except Exception as error:  # noqa: BLE001 - a YAML or OmegaConf syntax error, in the user's words below
        raise UserError(f"{source}: its config is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{source}: its config is not a mapping of keys to values")
    check_node(OmegaConf.to_container(loaded, resolve=False), "", source, trusted)
    return loaded


def check_node(node, key: str, source: str, trusted: tuple[str, ...]) -> None:
    """Walk every value; refuse a target that is not allowed, an interpolation, or a key that is not a string."""
    if isinstance(node, dict):
        for name, value in node.items():
            if not isinstance(name, str):
                raise UserError(f"{source}: config key {join(key, str(name))!r} is not a string")
            here = join(key, name)
            if "${" in name:
                raise UserError(f"{source}: config key {here!r} holds an interpolation; mtmm evaluates none from a "
                                f"loaded config")
            if name == "_target_" and value is not None:
                if not isinstance(value, str):
                    raise UserError(f"{source}: config key {here} is {value!r}, not a builder's name")
                if not allowed(value, trusted):
                    raise UserError(
                        f"{source}: config key {here} names {value!r}, which is not one of mtmm's builders; a "
                        f"loaded config may build only those. If it is your own code and you trust it, allow it "
                        f"with trusted_targets=[{value}]")
            check_node(value, here, source, trusted)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            check_node(item, f"{key}[{index}]", source, trusted)
    elif isinstance(node, str) and "${" in node:
        raise UserError(f"{source}: config key {key} = {node[:80]!r} holds an interpolation; mtmm evaluates none "
                        f"from a loaded config (checkpoints store their config resolved)")


def join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def own_cache_dirs(cache_dir: str | Path | None) -> dict[str, str]:
    """The cache keys of a training config for one cache folder, laid out as train.yaml lays out MTMM_CACHE."""
    root = Path(cache_dir if cache_dir is not None else os.environ.get("MTMM_CACHE", "~/.cache/mtmm")).expanduser()
    return {"data.source.cache_dir": str(root), "data.image_cache_dir": str(root / "images"),
            "trainer.feature_cache_dir": str(root / "features")}


def use_own_cache_dirs(loaded: DictConfig, own: dict[str, str | None]) -> None:
    """Point the cache keys of a `loaded` config at the folders the user running mtmm now configured (`own`: key
    -> folder); a key the loaded config does not have stays absent."""
    for key in CACHE_KEYS:
        if OmegaConf.select(loaded, key) is not None and own.get(key) is not None:
            OmegaConf.update(loaded, key, str(own[key]), merge=False)


def check_saved_data(state: dict, cfg: DictConfig, source: str) -> None:
    """The parts of a checkpoint that rebuild the data side, shaped as mtmm writes them: label names and regression
    statistics for every task of its config, tokenizer files when it has a text encoder. Else one line, not a
    KeyError deep inside the build."""
    data = state.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict) or not isinstance(data.get("stats"), dict):
        raise UserError(f"{source}: its data entry (label names, statistics) is missing or malformed")
    for task in cfg.get("tasks") or {}:
        classes, stats = data["classes"].get(task), data["stats"].get(task)
        if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
            raise UserError(f"{source}: no list of label names for task {task!r} in its data entry")
        if not (isinstance(stats, list) and len(stats) == 2 and all(isinstance(v, (int, float)) for v in stats)):
            raise UserError(f"{source}: no [mean, std] statistics for task {task!r} in its data entry")
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf") for t in calibration.values()):
        raise UserError(f"{source}: its calibration entry is not a mapping of task to a temperature > 0")
    text = OmegaConf.select(cfg, "encoder.text._target_")
    if text is not None and not isinstance(data.get("tokenizer_files"), dict):
        raise UserError(f"{source}: it has a text encoder but no tokenizer files")
    if not isinstance(state.get("model"), dict):
        raise UserError(f"{source}: it holds no model weights")
