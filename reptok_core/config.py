"""Config = nested dataclasses, filled from a YAML preset and then `key=value` overrides.

    cfg = load_config(TrainConfig, preset="configs/tokenizer/tiny.yaml",
                      overrides=["optim.lr=3e-4", "model.decoder.depth=4"])

Every field's help text lives in its dataclass as `field(metadata={"help": ...})`;
`describe(TrainConfig)` renders them for `--help`, so the documentation cannot drift from code.
The presets (sizes and recipes) live only in the YAML files under `configs/`; code that needs
one reads it there with `preset_section`.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

# The repository's configs/ folder, beside the package (a checkout or an editable install).
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through default_factory)."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kw
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def section(factory: type, help: str) -> Any:
    return dataclasses.field(default_factory=factory, metadata={"help": help})


class ConfigError(ValueError):
    pass


class Switch(enum.StrEnum):
    """A three-way option: forced on, forced off, or decided at run time (`auto`).

    Parses the words people write for a boolean too (true/false, yes/no, 1/0, YAML booleans);
    being a `str`, a member equals its word ("auto") and prints as it.
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def _missing_(cls, value: object) -> Switch | None:
        word = str(value).lower()
        if word in ("true", "yes", "1"):
            return cls.ON
        if word in ("false", "no", "0"):
            return cls.OFF
        return cls.__members__.get(word.upper())

    def decide(self, auto: bool) -> bool:
        """on -> True, off -> False, auto -> `auto` (what the run-time check found)."""
        return self is Switch.ON or (self is Switch.AUTO and auto)


def choice(cls: type[E], value: Any, where: str) -> E:
    """`value` as a member of the enum `cls` (Switch, Precision, ...); a ConfigError naming the
    option `where` and the choices otherwise."""
    try:
        return cls(value)
    except ValueError:
        words = " | ".join(m.value for m in cls)
        raise ConfigError(f"{where}={value!r}; expected one of {words}") from None


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return choice(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        # A free-form mapping has no field types to coerce to: a `key.sub=4` override arrives
        # as the string "4", so its words are read as YAML (4 -> int, true -> bool).
        return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain values only (enum options become their words), ready for JSON, YAML and MLflow."""

    def plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return {k: v.value if isinstance(v, enum.Enum) else v for k, v in items}

    return dataclasses.asdict(cfg, dict_factory=plain)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; used for MLflow params and for overrides."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    d[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        _set_path(out, key.strip(), value)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, section by section (an override of one key keeps its siblings)."""
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return data


def load_config(
    cls: type[T],
    preset: str | Path | None = None,
    overrides: list[str] | None = None,
) -> T:
    data = read_yaml(preset) if preset else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def preset_section(cls: type[T], preset: str, section: str = "model") -> T:
    """One section of a YAML preset as a `cls`: `preset_section(TokenizerConfig, "tokenizer/tiny")`
    reads `model:` of configs/tokenizer/tiny.yaml; `section` may be dotted ("model.mixer")."""
    path = CONFIGS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"preset {preset!r}: {path} does not exist (presets are the YAML files of the "
            "repository's configs/ folder)"
        )
    data: Any = read_yaml(path)
    for key in section.split("."):
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"preset {str(path)!r} has no section {section!r}")
        data = data[key]
    if not isinstance(data, dict):
        raise ConfigError(f"preset {str(path)!r}: section {section!r} is not a mapping")
    return from_dict(cls, data, f"{path}:{section}")


def describe(cls: type, prefix: str = "") -> str:
    """One line per option: dotted name, default and help; sections recurse."""
    lines = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n[{prefix}{f.name}] {help_text}")
            lines.append(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            words = " | ".join(m.value for m in tp)
            lines.append(f"  {prefix}{f.name}={default.value}  ({words})\n      {help_text}")
            continue
        lines.append(f"  {prefix}{f.name}={default!r}\n      {help_text}")
    return "\n".join(lines)
