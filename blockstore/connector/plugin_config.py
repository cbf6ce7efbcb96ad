"""The in-process remote-storage plugin's settings (`remote_storage_plugin.<name>.*` in LMCache's `extra_config`).

A module of its own because it is the plugin's only parser of outside input that runs before a store exists:
validation is fuzzed on its own (`fuzz/targets/plugin_config.py`) and needs neither a store nor a connector.
The keys and what they mean are in `remote_plugin.py`'s module docstring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmcache.v1.exceptions import IrrecoverableException

from blockstore.compaction import disabled, resolve
from blockstore.manifest import valid_block_size


class BlockstorePluginConfigError(ValueError, IrrecoverableException):
    """A bad `remote_storage_plugin.<name>.*` setting. Irrecoverable for LMCache: its RemoteBackend
    gives up at once instead of retrying the same configuration every 10 s."""


@dataclass(frozen=True)
class BlockstorePluginConfig:
    """The plugin's settings, read from LMCache's `extra_config` (see `remote_plugin.py`'s module docstring)."""

    path: str
    durability: str = "cache"
    block_size: int | None = None
    compaction: str | dict[str, Any] | None = "full"

    KEYS = ("module_path", "class_name", "path", "durability", "block_size", "compaction")

    @classmethod
    def from_extra_config(cls, extra_config: dict[str, Any] | None, plugin_name: str, *, worker_id: int = 0,
                          world_size: int = 1) -> BlockstorePluginConfig:
        prefix = f"remote_storage_plugin.{plugin_name}."
        ec = dict(extra_config or {})
        mine = {k[len(prefix):]: v for k, v in ec.items() if isinstance(k, str) and k.startswith(prefix)}
        # keys of another instance ("blockstore.b" when this is "blockstore") have a dot left in them
        unknown = sorted(k for k in mine if "." not in k and k not in cls.KEYS)
        if unknown:
            raise BlockstorePluginConfigError(
                f"extra_config: unknown key(s) {[prefix + k for k in unknown]}; known: "
                f"{[prefix + k for k in cls.KEYS]}")

        def bad(key: str, why: str) -> BlockstorePluginConfigError:
            return BlockstorePluginConfigError(f"extra_config '{prefix}{key}' {why}")

        path = mine.get("path")
        if not isinstance(path, str) or not path.strip():
            raise bad("path", f"(the store directory) is required, a non-empty string; got {path!r}")
        if "{" in path:
            try:
                path = path.format(worker_id=worker_id, world_size=world_size)
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # "{worker_id[0]}", ...
                raise bad("path", f"may contain only the placeholders {{worker_id}} and {{world_size}}: "
                                  f"{type(exc).__name__}: {exc}") from None
        durability = mine.get("durability", "cache")
        if durability not in ("cache", "sync"):
            raise bad("durability", f"must be 'cache' or 'sync', got {durability!r}")
        block_size = mine.get("block_size")
        if isinstance(block_size, str) and block_size.strip().isdigit():  # LMCACHE_EXTRA_CONFIG JSON may quote it
            try:
                block_size = int(block_size)
            except ValueError:  # digits int() refuses ("²", 5000 of them): stays a str, refused below
                pass
        if block_size is not None and not valid_block_size(block_size):
            raise bad("block_size", f"must be an integer number of bytes in 65536..2**40, got {block_size!r}")
        compaction = mine.get("compaction", "full")
        if isinstance(compaction, str) and compaction.strip().startswith("{"):
            try:
                compaction = json.loads(compaction)
            except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than json can parse
                raise bad("compaction", f"is not valid JSON: {exc}") from None
        if disabled(compaction):
            compaction = None
        if compaction is not None:
            spec = {k: v for k, v in compaction.items() if k != "background"} if isinstance(compaction, dict) \
                else compaction
            if isinstance(compaction, dict) and not isinstance(compaction.get("background", True), bool):
                # bool("no") is True; the store's open refuses it too, but as an error LMCache retries every 10 s
                raise bad("compaction", f"'background' must be true or false, got {compaction['background']!r}")
            try:
                resolve(spec)
            except (ValueError, TypeError) as exc:  # InvalidArgument is a ValueError
                raise bad("compaction", f"is not a valid compaction setting: {exc}") from None
        return cls(path=path, durability=durability, block_size=block_size, compaction=compaction)
