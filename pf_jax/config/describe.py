"""A recipe described to its user: `python -m pf_jax.train --help` (usage, the shipped recipes, how
overrides work) and `--print-config [section]` (the resolved recipe as YAML, every key with its default
and its one-line description from pf_jax.config.key_docs; loading that YAML gives the same recipe)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pf_jax.config.errors import ConfigError
from pf_jax.config.key_docs import KEY_DOCS
from pf_jax.config.loading import model_types, schema_keys
from pf_jax.config.recipe import CONFIGS_DIR

COMMENT_COLUMN = 44


def shipped_recipes(root: Path = CONFIGS_DIR) -> list[tuple[str, str]]:
    """(path relative to the configs folder, the first line of its header comment) of every shipped recipe."""
    out = []
    for path in sorted(root.rglob("*.yaml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        out.append((str(path.relative_to(root)), _first_clause(first)))
    return out


def _first_clause(text: str, width: int = 72) -> str:
    for stop in (": ", ". ", "; "):
        if stop in text:
            text = text.split(stop, 1)[0]
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def print_config_request(argv: list[str]) -> tuple[bool, str | None, list[str]]:
    """(whether `--print-config [SECTION]` or `--print-config=SECTION` is in argv, the section, the other
    arguments). The word after the flag is its section unless it is an option or an override."""
    rest, asked, section, i = [], False, None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--print-config":
            asked = True
            if i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
                section, i = argv[i + 1], i + 1
        elif arg.startswith("--print-config="):
            asked, section = True, arg.split("=", 1)[1] or None
        else:
            rest.append(arg)
        i += 1
    return asked, section, rest


def usage_text() -> str:
    """The text of `python -m pf_jax.train --help`."""
    recipes = "\n".join(f"  configs/{name:<40} {summary}" for name, summary in shipped_recipes())
    return f"""usage: python -m pf_jax.train [--config RECIPE.yaml] [key.sub=value ...]
                          [--print-config [SECTION]] [--dry-run [--topology SLICE] [--json PATH]]

Train a language model with one recipe: a YAML file of the schema in pf_jax/config/recipe.py, then
dotted overrides, later wins. A bare call runs configs/default.yaml (PowerFlow on a tiny arithmetic
model, CPU, minutes).

options:
  -h, --help              this text
  --config PATH           the recipe (it may `extends:` others); default configs/default.yaml
  key.sub=value           an override, value as YAML: optimizer.lr=1e-4  rollout.stop='["\\n\\n"]'
                          method.loss={{clip_low: 0.2}}  model.lora=null
  --print-config [SECTION]  print the resolved recipe (with overrides) as YAML, each key with its
                          default and description, and exit; SECTION (e.g. method, rollout,
                          model.lora) prints that section only
  --dry-run               plan per-device memory without loading weights or data
  --topology SLICE        with --dry-run: compile every program for a TPU slice (e.g. v5p:4x4x4)
  --json PATH             with --topology: write the compiled plan as JSON

recipes shipped (paths relative to the checkout, or pf_jax/configs in an installed package):
{recipes}

An unknown key names the nearest valid one; a key that does not apply to method.name is an error
naming the methods it belongs to; any user mistake is one line on stderr and exit code 2.
Caches (the dequantised embedded model, its tokenizer, CPU kernels) live under $PF_JAX_CACHE
(default ~/.cache/pf_jax)."""


def describe_config(config: BaseModel, section: str | None = None,
                    notes: Mapping[str, str] | None = None) -> str:
    """`config` (or its dotted `section`) as YAML: each key's value, then `# description (default: X)`
    and, where `notes` has the key, that note. An unknown section is a ConfigError naming the sections."""
    notes = dict(notes or {})
    if section is None:
        return "\n".join(_lines(config, type(config)(), "", 0, notes)) + "\n"
    parts = section.split(".")
    value, default, schema = config, type(config)(), type(config)
    for depth, part in enumerate(parts):
        fields = schema.model_fields
        if part not in fields or not model_types(fields[part].annotation):
            sections = section_names(type(config))
            raise ConfigError(f"--print-config {section!r}: {'.'.join(parts[: depth + 1])!r} is not a section; "
                              f"sections: {', '.join(sections)}")
        schema = model_types(fields[part].annotation)[0]
        value = getattr(value, part) if value is not None else None
        default = getattr(default, part, None) if default is not None else None
    if value is None:  # an optional section that is off (model.lora): show what setting it would give
        value, default = schema(), schema()
    lines = [f"{'  ' * i}{p}:" for i, p in enumerate(parts)]
    return "\n".join([*lines, *_lines(value, default, section + ".", len(parts), notes)]) + "\n"


def _is_section(schema: type[BaseModel], dotted: str) -> bool:
    for part in dotted.split("."):
        field = schema.model_fields[part]
        models = model_types(field.annotation)
        if not models:
            return False
        schema = models[0]
    return True


def _lines(value: BaseModel, default: BaseModel | None, prefix: str, depth: int,
           notes: dict[str, str]) -> Iterator[str]:
    indent = "  " * depth
    for name, field in type(value).model_fields.items():
        key, item = prefix + name, getattr(value, name)
        base = getattr(default, name, None) if default is not None else None
        doc = KEY_DOCS.get(key, "")
        if isinstance(item, BaseModel):
            yield _with_comment(f"{indent}{name}:", doc)
            yield from _lines(item, base if isinstance(base, BaseModel) else None, key + ".", depth + 1, notes)
            continue
        comment = f"{doc} (default: {_flow(field.get_default(call_default_factory=True))})"
        if key in notes:
            comment += f"; {notes[key]}"
        yield _with_comment(f"{indent}{name}: {_flow(item)}", comment)
        if item is None and model_types(field.annotation):  # an optional section left off
            yield f"{indent}  # set a key below {key} to turn it on: " + ", ".join(
                f"{n} ({_flow(f.get_default(call_default_factory=True))})"
                for n, f in model_types(field.annotation)[0].model_fields.items())


def _flow(value: Any) -> str:
    """A value as one line of YAML (flow style), as `load_config` reads it back."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _with_comment(line: str, comment: str) -> str:
    return f"{line:<{COMMENT_COLUMN}} # {comment}" if comment else line


def section_names(schema: type[BaseModel]) -> list[str]:
    """The dotted names --print-config takes."""
    return [k for k in schema_keys(schema) if _is_section(schema, k)]

