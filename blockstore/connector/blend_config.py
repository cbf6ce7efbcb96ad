"""The blend connector's settings: ``BlendSettings`` (parsed and checked from vLLM's
``kv_connector_extra_config``) and the configurations callers hand vLLM (``kv_transfer_extra_config``,
``multi_connector_config``); re-exported by ``blend_connector``, where vLLM and callers find them.

A module of its own because it is the connector's one parser of outside input and runs before any store,
weights or vLLM connector exists: it needs neither vLLM's connector base nor the worker's runtime. The rules
it shares with ``Blender(...)`` (numbers, counts, bools) are ``blockstore.blend.options``'s.

Extra config keys (all optional but the store path):
``blend.store_path`` store directory (created if absent); ``blend.model_dir`` weights for the blender
(default: vLLM's model folder); ``blend.separator`` separator string (default ``" # # "``, LMCache's
``blend_special_str``), tokenized with the model's tokenizer, or ``blend.separator_ids``;
``blend.ratio`` (0.15), ``blend.selector`` ("deviation"), ``blend.check_layer`` (1), ``blend.deviation``
("kv": what the deviation selector compares, "v", "k" or "kv"), ``blend.sink_tokens`` (0: first tokens of
each chunk always recomputed, inside the budget), ``blend.query_weighted`` (true: weigh each token's
deviation by the question's attention at the check layer), ``blend.gradual`` (1.0: CacheBlend's gradual
filtering selects this many times the budget at the check layer and narrows it at the next one),
``blend.recency`` (0.5: the deviation selector's score is divided by each token's distance to the question to
this power; 0 turns it off); ``blend.kv_format`` ("model": chunk KV records in the model's dtype, float32 on
the worker; "int8": 8 bits and a scale per token and kv head, about a quarter of float32's bytes; each format's
records are keyed apart, so switching starts an empty set of chunks);
``blend.min_chunk_tokens`` (16); ``blend.min_reused_tokens`` (one vLLM block);
``blend.namespace`` ("kv-blend"); ``blend.model_id`` (default: the weights' content hash, so records
of another checkpoint are never used); ``blend.stats_path`` a JSON file (in a folder that exists) the
worker rewrites after each request it served or stored (the counters of ``BlendCounters``), for callers in
another process; a write that fails is logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from blockstore.blend import DEFAULT_DEVIATION, DEFAULT_QUERY_WEIGHTED
from blockstore.blend import options as blend_options
from blockstore.blend.blender import DEVIATIONS, SELECTORS
from blockstore.blend.kv_codec import DEFAULT_KV_FORMAT, KV_FORMATS
from blockstore.blend.selection import DEFAULT_RECENCY
from blockstore.errors import InvalidArgument
from blockstore.validate import check_ns

DEFAULT_SEPARATOR = " # # "  # LMCache's blend_special_str
CONNECTOR_MODULE = "blockstore.connector.blend_connector"  # the module vLLM loads (kv_connector_module_path)
CONNECTOR_CLASS = "BlockstoreBlendConnector"


@dataclass(frozen=True)
class BlendSettings:
    store_path: str
    model_dir: str
    separator_ids: tuple[int, ...]
    ratio: float = 0.15
    selector: str = "deviation"
    check_layer: int = 1
    deviation: str = DEFAULT_DEVIATION
    sink_tokens: int = 0
    query_weighted: bool = DEFAULT_QUERY_WEIGHTED
    gradual: float = 1.0
    recency: float = DEFAULT_RECENCY
    kv_format: str = DEFAULT_KV_FORMAT
    min_chunk_tokens: int = 16
    min_reused_tokens: int = 0  # 0: one vLLM block
    namespace: str = "kv-blend"
    stats_path: str | None = None
    model_id: str | None = None

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any], default_model_dir: str) -> BlendSettings:
        known = {"blend.store_path", "blend.model_dir", "blend.separator", "blend.separator_ids", "blend.ratio",
                 "blend.selector", "blend.check_layer", "blend.deviation", "blend.sink_tokens", "blend.query_weighted", "blend.gradual",
                 "blend.recency", "blend.kv_format", "blend.min_chunk_tokens", "blend.min_reused_tokens",
                 "blend.namespace", "blend.stats_path", "blend.model_id"}
        ours = {k: v for k, v in extra.items() if k.startswith("blend.")}
        unknown = sorted(set(ours) - known)
        if unknown:
            raise InvalidArgument(f"{CONNECTOR_CLASS}: unknown kv_connector_extra_config key(s) {unknown}; "
                                  f"known: {sorted(known)}")
        if not ours.get("blend.store_path"):
            raise InvalidArgument(f"{CONNECTOR_CLASS}: kv_connector_extra_config needs 'blend.store_path' "
                                  "(the blockstore directory holding chunk KV)")
        model_dir = str(ours.get("blend.model_dir") or default_model_dir)
        if "blend.separator_ids" in ours:
            sep = _token_ids(ours["blend.separator_ids"])
        else:
            sep = separator_token_ids(model_dir, str(ours.get("blend.separator", DEFAULT_SEPARATOR)))
        if not sep:
            raise InvalidArgument(f"{CONNECTOR_CLASS}: the separator tokenizes to no token ids")
        ratio = _number(ours, "blend.ratio", 0.15, 0.0, 1.0)
        gradual = _number(ours, "blend.gradual", 1.0, 1.0, 100.0)
        recency = _number(ours, "blend.recency", DEFAULT_RECENCY, 0.0, 4.0)  # Blender's bounds
        qw = blend_options.flag("blend.query_weighted", ours.get("blend.query_weighted", DEFAULT_QUERY_WEIGHTED),
                          where=CONNECTOR_CLASS)
        for key in ("blend.store_path", "blend.namespace", "blend.selector", "blend.deviation", "blend.stats_path",
                    "blend.model_id"):
            if key in ours and not isinstance(ours[key], (str, os.PathLike)) \
                    and not (ours[key] is None and key in ("blend.stats_path", "blend.model_id")):
                raise InvalidArgument(f"{CONNECTOR_CLASS}: {key} must be a string, got {ours[key]!r}")
        namespace = str(ours.get("blend.namespace", "kv-blend"))
        try:  # checked here: a namespace the store refuses failed every blend and every chunk store, with warnings
            check_ns(namespace)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{CONNECTOR_CLASS}: blend.namespace: {exc}") from None
        stats = ours.get("blend.stats_path")
        if stats and not os.path.isdir(os.path.dirname(os.path.abspath(stats))):  # else the worker's first write raised
            raise InvalidArgument(f"{CONNECTOR_CLASS}: blend.stats_path {stats!r}: its folder does not exist")
        return cls(store_path=str(ours["blend.store_path"]), model_dir=model_dir, separator_ids=sep, ratio=ratio,
                   selector=blend_options.one_of("blend.selector", ours.get("blend.selector", "deviation"), SELECTORS,
                                                 where=CONNECTOR_CLASS),
                   check_layer=_count(ours, "blend.check_layer", 1, 0),
                   deviation=blend_options.one_of("blend.deviation", ours.get("blend.deviation", DEFAULT_DEVIATION),
                                                  DEVIATIONS, where=CONNECTOR_CLASS),
                   sink_tokens=_count(ours, "blend.sink_tokens", 0, 0),
                   query_weighted=qw, gradual=gradual, recency=recency,
                   kv_format=blend_options.one_of("blend.kv_format", ours.get("blend.kv_format", DEFAULT_KV_FORMAT),
                                                  KV_FORMATS, where=CONNECTOR_CLASS),
                   min_chunk_tokens=_count(ours, "blend.min_chunk_tokens", 16, 1),
                   min_reused_tokens=_count(ours, "blend.min_reused_tokens", 0, 0),
                   namespace=namespace, stats_path=None if stats is None else str(stats),
                   model_id=ours.get("blend.model_id"))


# Each setting is checked here, at vLLM's start, naming its key: a value that only failed later (min_chunk_tokens 0
# raised in the scheduler at the first prompt; a separator_ids string was split into its characters' digits, so no
# prompt ever matched) or raised a bare ValueError/TypeError without the key.
def _token_ids(value: Any) -> tuple[int, ...]:
    return blend_options.token_ids("blend.separator_ids", value, where=CONNECTOR_CLASS)


def _number(ours: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    raw = ours.get(key, default)
    if isinstance(raw, str):  # a number written as a JSON string; what does not parse is refused below, as a str
        try:
            raw = float(raw)
        except ValueError:
            pass
    return blend_options.real_in(key, raw, lo, hi, where=CONNECTOR_CLASS)


def _count(ours: dict[str, Any], key: str, default: int, lo: int) -> int:
    raw = ours.get(key, default)
    if isinstance(raw, str):
        try:
            raw = int(raw)
        except ValueError:
            pass  # refused below, as the str it is
    return blend_options.count(key, raw, lo, where=CONNECTOR_CLASS)


def separator_token_ids(model_dir: str, separator: str) -> tuple[int, ...]:
    """The separator as the model's tokenizer writes it (no special tokens): prompts must carry exactly
    these ids between chunks."""
    path = Path(model_dir) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise InvalidArgument(f"{CONNECTOR_CLASS}: cannot read the tokenizer at {path} to tokenize the blend "
                              f"separator {separator!r} ({exc}); give blend.separator_ids instead") from exc
    return tuple(tok.encode(separator, add_special_tokens=False).ids)


def kv_transfer_extra_config(store_path: str | os.PathLike[str], **settings: Any) -> dict[str, Any]:
    """``kv_connector_extra_config`` for this connector: ``blend.store_path`` plus ``blend.<key>`` for
    each keyword (``ratio=0.15, separator=" # # ", stats_path=...``)."""
    return {"blend.store_path": str(store_path), **{f"blend.{k}": v for k, v in settings.items() if v is not None}}


def multi_connector_config(store_path: str | os.PathLike[str], lmcache_port: int | None,
                           **settings: Any) -> dict[str, Any]:
    """Arguments of ``KVTransferConfig`` for vLLM's ``MultiConnector``: this connector first (it claims
    only prompts with stored chunks), then LMCache's MP connector for prefix reuse, when a port is given."""
    connectors: list[dict[str, Any]] = [{
        "kv_connector": CONNECTOR_CLASS, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
        "kv_connector_extra_config": kv_transfer_extra_config(store_path, **settings)}]
    if lmcache_port is not None:
        connectors.append({"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1",
                                                         "lmcache.mp.port": lmcache_port}})
    # "recompute": blocks this connector reports as failed are computed by vLLM (the default, "fail",
    # fails the request)
    return {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"connectors": connectors}}
