"""What raymia says about itself: every spec field and registered parameter described (the JSON Schema's
descriptions are what editors show, `raymia list` prints the parameters'), and the README's spec table
agreeing with the code's defaults."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

import raymia
from raymia.cli import _registries
from raymia.spec import SweepSpec

# words that add nothing to a description that otherwise only names the field
_FILLER = {"the", "a", "an", "of", "in", "to", "for", "its", "is", "number", "this", "that"}


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}


def _undescribed(field: str, description: str | None) -> bool:
    """No description, or one whose words are only the field name's (`batch_size`: "batch size")."""
    return not description or _words(description) - _FILLER <= _words(field.replace("_", " "))


def _schema_fields(node: Any, path: str) -> list[tuple[str, str, str | None]]:
    """(where, field, description) of every property of every object in a JSON Schema."""
    out = []
    if isinstance(node, dict):
        for name, prop in node.get("properties", {}).items():
            out.append((path, name, prop.get("description")))
        for key, child in node.items():
            out += _schema_fields(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out += _schema_fields(child, f"{path}[{i}]")
    return out


def test_every_spec_field_is_described():
    fields = _schema_fields(raymia.spec_schema(), "")
    assert len(fields) > 100  # the walk reaches the nested models, the named entries' anyOf included
    missing = [f"{where or '/'}: {name}" for where, name, desc in fields if _undescribed(name, desc)]
    assert not missing, "spec fields without a description:\n" + "\n".join(missing)


def test_every_registered_parameter_is_described():
    seen = 0
    missing = []
    for kind, registry in _registries().items():
        for entry in registry.entries():
            assert entry.doc, f"{kind} {entry.name} has no description"
            for name, field in entry.params.model_fields.items():
                seen += 1
                if _undescribed(name, field.description):
                    missing.append(f"{kind} {entry.name}: {name} ({field.description!r})")
    assert seen > 250
    assert not missing, "parameters without a description:\n" + "\n".join(missing)


def test_a_description_that_repeats_the_name_counts_as_none():
    assert _undescribed("batch_size", "batch size") and _undescribed("num_models", "The number of models.")
    assert _undescribed("seed", None) and _undescribed("seed", "")
    assert not _undescribed("batch_size", "examples per training step")


# ---------------------------------------------------------------------------------------------------------
# README.md's spec table

README = Path(__file__).resolve().parents[1] / "README.md"

# rows whose default cell lists several sub-fields' defaults, in this order
_COMPOUND = {
    "train": ["optimizer", "lr", "epochs", "batch_size", "schedule"],
    "metrics": ["fpr_levels", "fnr_levels", "bootstrap", "label_only_for_output_defenses", "raw_outputs"],
    "bank": ["engine", "num_workers", "cpus_per_worker", "pack_size", "vectorize", "device", "precision",
             "channels_last"],
    "tracking": ["enabled", "uri", "experiment", "log_signals"],
    "sweep": ["defense", "space", "num_trials"],
}
# default cells that say "not set" in words
_UNSET = {"all", "no split", "`output_dir`", "its declared space", "none"}


def _spec_table() -> list[tuple[list[str], str]]:
    """(fields, default) of each row of the README's table under "## The spec"."""
    text = README.read_text().split("## The spec", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or cells[0] in ("field", "---"):
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[2]))
    return rows


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def _value(cell: str, field: str) -> Any:
    cell = re.sub(r"\s*\([^)]*\)$", "", cell.strip())  # a remark in brackets: "(the quickstart: 7)"
    if cell in _UNSET:
        return None
    cell = cell.removesuffix(f" {field.split('.')[-1]}").removesuffix(" trials")  # "100 epochs", "8 trials"
    value = yaml.safe_load(cell.strip("`"))
    try:
        return float(value) if isinstance(value, str) else value  # YAML 1.1 reads 1e-3 as a string
    except ValueError:
        return value


def _default(spec: dict[str, Any], dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split("."):
        value = value.get(part)  # None: left out of the dump while unset
    if isinstance(value, dict) and "name" in value:  # a registry entry: its name
        return value["name"]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "name" in value[0]:
        return [v["name"] for v in value]
    return None if value in ({}, []) else value  # "not set" in words


def test_the_readme_spec_table_gives_the_codes_defaults():
    spec = SweepSpec().model_dump(mode="json")
    rows = _spec_table()
    documented = set()
    compared = 0
    for fields, cell in rows:
        documented |= {f.split(".")[0] for f in fields}
        field = fields[0]
        if field in _COMPOUND:
            values = _split_top(cell)
            assert len(values) == len(_COMPOUND[field]), (field, values)
            pairs = [(f"{field}.{sub}", v) for sub, v in zip(_COMPOUND[field], values)]
        elif field == "attacks":  # a list of names
            pairs = [(field, f"[{cell}]")]
        else:  # one field, or fields that share the default (data.private_classes, data.public_classes)
            pairs = [(f, cell) for f in fields if f.count(".") <= 1 and f.split(".")[0] in spec]
        for dotted, text in pairs:
            expected = _default(spec, dotted)
            got = _value(text, dotted)
            if got is False and expected is None:  # "off": a switch's false, a block's unset
                got = None
            assert got == expected, f"README's spec table: {dotted} is documented as {text!r}, the code's default is {expected!r}"
            compared += 1
    assert compared >= 30
    assert documented == set(SweepSpec.model_fields), set(SweepSpec.model_fields) ^ documented


# ---------------------------------------------------------------------------------------------------------
# raymia list


def test_list_reads_at_100_columns_with_ranges_and_nothing_cut_off(capsys, monkeypatch):
    from rich.cells import cell_len

    from raymia.cli import build_parser, cmd_list

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal 100 columns wide
    monkeypatch.setenv("COLUMNS", "100")
    assert cmd_list(build_parser().parse_args(["list"])) == 0  # not main(): it would set up the raymia logger
    lines = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out).splitlines()  # the terminal's styles
    assert max(cell_len(line) for line in lines) <= 100
    assert not [line for line in lines if "…" in line]  # nothing shortened with an ellipsis
    borders = "│┃┓┫┩┤┘"
    cropped = [line for line in lines if line[:1] in "┏┃┡│└" and line[-1:] not in borders]
    assert not cropped, cropped[:3]  # a table wider than the console loses its right-hand columns
    text = "\n".join(lines)
    for needle in ("float in (0, 1)", "int >= 1", "int >= 0 | None", "log [0.0001, 0.05]", "0.95"):
        assert needle in text, needle  # the range beside the type, defaults and search spaces whole
    headers = [line for line in lines if line.startswith("defense llla: ")]
    assert headers and cell_len(headers[0]) <= 100  # a long description wraps at a space, not past the edge


def test_help_lists_each_spec_models_fields_and_the_schema_keeps_its_summary():
    import pydoc

    from raymia.spec import TrainSpec

    text = pydoc.render_doc(raymia.SweepSpec, renderer=pydoc.plaintext)
    assert "seed (default 0): the bank's random choices derive from it" in text
    assert "sweep: what to search and how" in text  # a block: its description gives its default
    assert "lr (default 0.001): learning rate" in TrainSpec.__doc__
    schema = raymia.spec_schema()
    descriptions = [schema["description"], *(d.get("description", "") for d in schema["$defs"].values())]
    assert not [d for d in descriptions if "Fields:" in d]  # each property describes itself there
    assert schema["$defs"]["TrainSpec"]["description"].startswith("The training recipe, applied identically")
