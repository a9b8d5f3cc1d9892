"""Load a typed config from YAML files (with `extends:`) and dotted `key.sub=value` overrides.

Layers, later wins: the `extends:` chain of the recipe (base first), the recipe itself, then each CLI
override in order. Mappings merge key by key; any other value (lists included) replaces. Every key of
the merged tree is checked against the schema before validation so that an unknown key is reported with
its full dotted path, where it came from, and the nearest valid key of the whole schema.
"""

import difflib
import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pf_jax.config.errors import ConfigError

Schema = TypeVar("Schema", bound=BaseModel)

EXTENDS_KEY = "extends"


class _ScalarLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6` and `3E5` as floats (YAML 1.1 wants `1.0e-6`), and refuses a key
    given twice in one mapping (YAML's own loader lets the last one win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKeyError(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"key '{key}' is given twice (lines {first_line} and {line})")
        self.key, self.first_line, self.line = key, first_line, line


_ScalarLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_config(schema: type[Schema], path: str | Path | None = None, overrides: Sequence[str] = ()) -> Schema:
    """Build `schema` from the YAML recipe at `path` (or the schema's defaults) and dotted overrides.

    Raises ConfigError for an unreadable file, an `extends:` cycle, a malformed override, an unknown key
    (naming the nearest valid one) or a value of the wrong type or range (naming the field and what it
    expects).
    """
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        tree = _read_recipe(Path(path), chain=())
        for key in _dotted_leaves(tree):
            origin[key] = str(path)
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
        origin = {k: v for k, v in origin.items() if not k.startswith(key + ".")}  # replaced below `key`
        origin[key] = f"override '{override}'"
    _check_keys(schema, tree, origin)
    try:
        return schema.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(error, origin)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value` into the dotted key and the value parsed as a YAML scalar (or flow list/map)."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.load(raw_value, Loader=_ScalarLoader) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from None
    return key, value


def parse_cli_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split `[--config PATH] [key.sub=value ...]` (also `--config=PATH`) into the path and overrides.

    Any other `-`/`--` option, a repeated --config, or a bare word without `=` is a ConfigError.
    """
    path: str | None = None
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            if path is not None:
                raise ConfigError("--config given twice; pass one recipe (it can `extends:` others)")
            if arg == "--config":
                if not args:
                    raise ConfigError("--config needs a path to a YAML recipe")
                path = args.pop(0)
            else:
                path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; expected --config PATH and key.sub=value overrides")
        else:
            parse_override(arg)
            overrides.append(arg)
    return path, overrides


def config_to_yaml(config: BaseModel) -> str:
    """The full config as YAML (every key, defaults included); `load_config` of it gives it back."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def schema_keys(schema: type[BaseModel]) -> list[str]:
    """Every dotted key the schema accepts: sections and leaves, e.g. `optimizer`, `optimizer.lr`."""
    return sorted(_walk_schema(schema, prefix=""))


def _read_recipe(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file '{path}': {error.strerror or error}") from None
    try:
        tree = yaml.load(text, Loader=_ScalarLoader)
    except _DuplicateKeyError as error:
        raise ConfigError(f"config file '{path}': key '{error.key}' is given twice (lines {error.first_line} and "
                          f"{error.line}); keep one") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(tree).__name__}")
    parents = tree.pop(EXTENDS_KEY, None)
    if parents is None:
        return tree
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"'{EXTENDS_KEY}' in '{path}' must be a path or a list of paths, got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _read_recipe(path.parent / parent, (*chain, resolved)))
    return _merge(merged, tree)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _dotted_leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _dotted_leaves(value, dotted + ".")
        else:
            yield dotted


def model_types(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (through Optional, unions and Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return model_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in model_types(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _is_free_mapping(annotation: Any) -> bool:
    """A `dict[...]` field (possibly optional): any key is allowed below it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_is_free_mapping(arg) for arg in typing.get_args(annotation))
    return origin is dict or annotation is dict


def _field_name(name: str, field: Any) -> str:
    return field.alias or name


def _walk_schema(schema: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in schema.model_fields.items():
        dotted = f"{prefix}{_field_name(name, field)}"
        yield dotted
        for model in model_types(field.annotation):
            yield from _walk_schema(model, dotted + ".")


def _check_keys(schema: type[BaseModel], tree: dict[str, Any], origin: dict[str, str]) -> None:
    valid = schema_keys(schema)
    for problem in _unknown_keys(schema, tree, prefix=""):
        where = _origin_of(problem, origin)
        hint = _nearest_key(problem, valid)
        message = f"unknown config key '{problem}'"
        if hint:
            message += f"; did you mean '{hint}'?"
        if where:
            message += f" (from {where})"
        raise ConfigError(message)


def _unknown_keys(schema: type[BaseModel], tree: dict[str, Any], prefix: str) -> Iterator[str]:
    fields = {_field_name(n, f): f for n, f in schema.model_fields.items()}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            # Name the deepest key the user wrote, so `trainer.lr=1` reports `trainer.lr`.
            yield next(_dotted_leaves({key: value}, prefix)) if isinstance(value, dict) else dotted
            continue
        annotation = fields[key].annotation
        models = model_types(annotation)
        if models and isinstance(value, dict) and not _is_free_mapping(annotation):
            # For a union of sections a key is unknown only if no member accepts it.
            per_model = [set(_unknown_keys(m, value, dotted + ".")) for m in models]
            yield from sorted(set.intersection(*per_model))


def _nearest_key(key: str, valid: list[str]) -> str | None:
    """Closest valid dotted key: full-path similarity, boosted when the last component matches exactly."""
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        ratio = difflib.SequenceMatcher(None, key, candidate).ratio()
        leaf_ratio = difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio()
        return ratio + 0.5 * leaf_ratio

    best = max(valid, key=score, default=None)
    if best is None or score(best) < 0.9:
        return None
    return best


def _origin_of(key: str, origin: dict[str, str]) -> str | None:
    for prefix in [key, *(key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1))]:
        if prefix in origin:
            return origin[prefix]
    matches = [src for k, src in origin.items() if k.startswith(key + ".")]
    return matches[0] if matches else None


def _describe_validation_error(error: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for item in error.errors(include_url=False):
        key = ".".join(str(part) for part in item["loc"])
        where = _origin_of(key, origin) if key else None
        message = item["msg"].removeprefix("Value error, ")
        line = f"config key '{key}': {message}" if key else f"invalid config: {message}"
        if "input" in item and item["type"] != "missing" and not isinstance(item["input"], dict):
            line += f" (got {item['input']!r})"
        if where:
            line += f" (from {where})"
        lines.append(line)
    return "invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0]
