"""What raymia says about itself: every spec field and registered parameter described (the JSON Schema's
descriptions are what editors show, `raymia list` prints the parameters'), and the README's spec table
agreeing with the code's defaults."""

from __future__ import annotations

import re
from typing import Any

import raymia
from raymia.cli import _registries

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
