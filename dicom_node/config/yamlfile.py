"""YAML reading that refuses a duplicate mapping key instead of keeping the last one silently.

PyYAML's ``safe_load`` keeps the last of two equal keys, so a second ``ae_title`` or a second
destination of the same name in ``node.yaml`` (or a repeated key in ``model.yaml``) would win
without a word. :func:`safe_load` raises :class:`DuplicateKeyError` naming the key and both
lines. Merge keys (``<<: *defaults``) still override as YAML defines.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; the message names the key and its lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader refuses it with its own error
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} on line {line} (first on line {first}); "
                    "keep only one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str) -> Any:
    """Parse ``text`` like :func:`yaml.safe_load`, refusing duplicate mapping keys.

    Raises
    ------
    DuplicateKeyError
        When a mapping holds a key twice (a :class:`yaml.YAMLError`).
    yaml.YAMLError
        When ``text`` is not valid YAML.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
