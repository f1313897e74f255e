"""Registry of KV formats: `get_kv_format("int4", group_size=64)` or `get_kv_format("int4:group_size=64")`.

| name            | class        | module      | options                                        |
| --------------- | ------------ | ----------- | ---------------------------------------------- |
| none (bf16/fp16)| NoneFormat   | kv_dense    | -                                              |
| fp8             | FP8Format    | kv_dense    | scale (initial per-head scale, default 1.0)    |
| int8            | Int8Format   | kv_dense    | -                                              |
| int4            | Int4Format   | kv_int4     | group_size 32/64/128 channels (default 128)    |
| kivi2           | Kivi2Format  | kv_kivi     | group_size 32/64/128 tokens (32), residual (=group_size), value_group_size 64/128 (the head's, at most 128) |

The packed layout of each format is in its module's docstring; `kv_base` has the cache container,
the engine contract (slots, block tables) and block export/import. The string form is what a model
config or cluster spec carries (`kv_format: "kivi2:group_size=32,residual=64"`).
"""
from __future__ import annotations

import dataclasses

from partita.kernels.kv_base import KVFormat, PagedKVCache, export_blocks, import_blocks
from partita.kernels.kv_dense import FP8Format, Int8Format, NoneFormat
from partita.kernels.kv_int4 import Int4Format
from partita.kernels.kv_kivi import Kivi2Format

KV_FORMATS: dict[str, type[KVFormat]] = {
    "none": NoneFormat, "bf16": NoneFormat, "fp16": NoneFormat,
    "fp8": FP8Format, "int8": Int8Format, "int4": Int4Format, "kivi2": Kivi2Format,
}

__all__ = ["KV_FORMATS", "KVFormat", "PagedKVCache", "export_blocks", "get_kv_format",
           "import_blocks"]


def _parse(spec: str) -> tuple[str, dict[str, object]]:
    name, _, rest = spec.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"kv_format {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = float(value) if "." in value else int(value)
    return name.strip().lower(), options


def get_kv_format(spec: str | KVFormat, **options: object) -> KVFormat:
    """The format named by `spec` ("int4", "int4:group_size=64"), keyword options on top."""
    if isinstance(spec, KVFormat):
        return dataclasses.replace(spec, **options) if options else spec
    name, parsed = _parse(spec)
    if name not in KV_FORMATS:
        raise ValueError(f"kv_format={spec!r}: unknown; allowed {sorted(KV_FORMATS)}")
    cls = KV_FORMATS[name]
    parsed.update(options)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(parsed) - allowed)
    if unknown:
        raise ValueError(f"kv_format={spec!r}: unknown option(s) {unknown}; "
                         f"{name} takes {sorted(allowed) or 'none'}")
    return cls(**parsed)
