"""Real-dataset formats: each reads its on-disk layout into a prepared dataset (manifest + card).

Every format registers two functions under one name:

* an *adapter* ``adapt(source, out_dir, *, name, **options) -> DatasetCard`` that reads the real
  layout at ``source`` and writes a self-contained prepared dataset into ``out_dir``
  (see :mod:`fer_core.data.manifest`);
* a *synthetic writer* ``write(out_dir, *, seed, size, difficulty) -> Path`` that renders SynthFACS
  data in that same real layout and returns the path to hand to the adapter, so demos and tests go
  through exactly the loaders real data uses.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fer_core.data.manifest import DatasetCard
from fer_core.errors import UsageError

Adapter = Callable[..., DatasetCard]
Writer = Callable[..., Path]


@dataclass(frozen=True)
class DataFormat:
    name: str
    task: str
    description: str
    adapt: Adapter
    write_synthetic: Writer | None = None


_FORMATS: dict[str, DataFormat] = {}
_FORMAT_MODULES = (
    "fer_core.data.formats.fer2013",
    "fer_core.data.formats.image_folder",
    "fer_core.data.formats.micro",
    "fer_core.data.formats.dfew",
    "fer_core.data.formats.au_table",
    "fer_core.data.formats.affectnet",
    "fer_core.data.formats.magnified_pairs",
)


def register_format(fmt: DataFormat) -> DataFormat:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] != fmt:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def _load() -> None:
    # Every listed module must import: a typo or a broken import is an error, never a missing format.
    for module in _FORMAT_MODULES:
        importlib.import_module(module)


def list_formats() -> list[DataFormat]:
    _load()
    return [_FORMATS[k] for k in sorted(_FORMATS)]


def get_format(name: str) -> DataFormat:
    _load()
    if name not in _FORMATS:
        raise UsageError(f"unknown data format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def adapt(
    format_name: str,
    source: Path,
    out_dir: Path,
    *,
    name: str,
    drop_cross_split_duplicates: bool = False,
    **options: Any,
) -> DatasetCard:
    """Read ``source`` in ``format_name`` into a prepared dataset at ``out_dir``.

    ``drop_cross_split_duplicates``: remove evaluation rows whose pixels also occur in an earlier
    split (train before val before test), e.g. FER2013's known Training/PublicTest duplicates. Off by
    default so the data gate reports such leaks; when on, the count is recorded in the card.
    """
    source = Path(source)
    if not source.exists():
        raise UsageError(f"source {source} does not exist")
    fmt = get_format(format_name)
    options = adapter_options(fmt, options)
    card = fmt.adapt(source, Path(out_dir), name=name, **options)
    if drop_cross_split_duplicates:
        card = _drop_cross_split_duplicates(Path(out_dir), card)
    return card


def adapter_options(fmt: DataFormat, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` coerced by the types of ``fmt``'s adapter keywords; unknown ones refused, listing the known."""
    from fer_core.training.recipe import coerce_options, option_types

    known = option_types(fmt.adapt, exclude=("source", "out_dir", "name"))
    return coerce_options(options, known, fmt.name, what="adapter option")


def _drop_cross_split_duplicates(root: Path, card: DatasetCard) -> DatasetCard:
    import dataclasses

    from fer_core.data.manifest import SPLITS, class_counts, read_manifest, write_prepared

    df = read_manifest(root)
    rank = df["split"].map({s: i for i, s in enumerate(SPLITS)}).fillna(len(SPLITS))
    hashed = df["content_hash"].fillna("") != ""
    first_rank = rank[hashed].groupby(df.loc[hashed, "content_hash"]).transform("min")
    drop = df.index[hashed][(rank[hashed] > first_rank).to_numpy()]
    kept = df.drop(index=drop).reset_index(drop=True)
    provenance = {**card.provenance, "dropped_cross_split_duplicates": int(len(drop))}
    card = dataclasses.replace(card, counts=class_counts(kept, card.classes), num_samples=int(len(kept)),
                               provenance=provenance)
    write_prepared(root, kept, card)
    return card
