"""YAML as the config is read: safe_load, but a key given twice is refused and aliases are bounded."""

from __future__ import annotations

from typing import Any

import yaml

MAX_ALIASES = 100


class _Loader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (silently last-wins otherwise) and bounds alias expansion."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name)", self.peek_event().start_mark
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # complex keys are refused by the schema anyway
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (each key may appear once)", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise plain errors for some values (`!!timestamp x`, `!!bool x`,
        # `!!int ""`, an integer of 5000 digits): made YAMLErrors with the value's line, as the others are.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, LookupError, AttributeError, TypeError) as exc:
            message = f"cannot read this {node.tag.rpartition(':')[2]}: {str(exc)[:100]}"
            raise yaml.constructor.ConstructorError(None, None, message, node.start_mark) from exc


def load_yaml(raw: bytes) -> Any:
    """Parse a YAML document; yaml.YAMLError (with the line) for a syntax error, a duplicate key, an alias bomb,
    a value its tag cannot read, or collections nested deeper than the parser's recursion can follow."""
    try:
        return yaml.load(raw, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # the parser recurses once per level: a few hundred `[` exhaust the stack
        raise yaml.YAMLError("collections nested too deeply") from None
