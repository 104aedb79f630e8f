"""The composite micro-expression set of MEGC 2019: CASME II + SAMM + SMIC(-HS) in three classes.

Each part is a prepared ``micro`` dataset in the composite classes (:data:`labels.SMIC_CLASSES`:
negative, positive, surprise): SMIC as it is, CASME II and SAMM adapted with ``classes=composite``
(:mod:`fer_core.data.formats.micro`, where the emotion -> class mapping is documented). The merge is
one prepared dataset whose ids, paths and subjects carry the part's name (``casme2/sub01``,
``samm/006``, ``smic/s1``), so leave-one-subject-out runs over every subject of the three sets at
once, and per-part metrics can be recomputed from the subjects' prefixes, as MEGC reports them.

Files are hard-linked from the parts when the filesystem allows it (a copy otherwise), so the merge
costs no second copy of the clips.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from fer_core.data.labels import SMIC_CLASSES
from fer_core.data.manifest import CARD_FILE, MANIFEST_FILE, DatasetCard, read_card, read_manifest, write_prepared

SEPARATOR = "/"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_composite(parts: Mapping[str, Path], out_dir: Path, *, name: str = "megc2019-composite",
                    provenance: Mapping[str, object] | None = None) -> DatasetCard:
    """Merge prepared micro datasets ``{part name: root}`` (all in the composite classes) at ``out_dir``."""
    import pandas as pd

    if len(parts) < 2:
        raise ValueError(f"a composite set merges at least two datasets, got {len(parts)}")
    frames = []
    for part, root in parts.items():
        if not part or SEPARATOR in part or part.startswith("."):
            raise ValueError(f"part name {part!r} must be a plain name (it prefixes the subjects)")
        card = read_card(root)
        if card.task != "micro":
            raise ValueError(f"{card.name} is a {card.task} dataset; the composite merges micro-expression sets")
        if tuple(card.classes) != SMIC_CLASSES:
            raise ValueError(f"{card.name} has classes {tuple(card.classes)}, not the composite {SMIC_CLASSES}: "
                             "add CASME II / SAMM with -o classes=composite")
        frame = read_manifest(root).copy()
        for column in ("id", "path", "source"):
            frame[column] = part + SEPARATOR + frame[column].astype(str)
        frame["subject"] = part + SEPARATOR + frame["subject"].astype(str)
        frames.append(frame)
        target = Path(out_dir) / part
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(root, target, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(MANIFEST_FILE, CARD_FILE, ".dvc*"))
    df = pd.concat(frames, ignore_index=True)
    counts: dict[str, dict[str, int]] = {}
    for split, group in df.groupby("split"):
        counts[str(split)] = {c: int((group["label"] == i).sum()) for i, c in enumerate(SMIC_CLASSES)}
    card = DatasetCard(name=name, task="micro", source_format="composite", classes=SMIC_CLASSES,
                       subject_independent=True,
                       splits=tuple(sorted(set(df["split"]))), num_samples=len(df), counts=counts,
                       provenance={"parts": list(parts), **dict(provenance or {})})
    write_prepared(out_dir, df, card)
    return card


def part_of(subject: str) -> str:
    """The part a composite subject id comes from (``samm/006`` -> ``samm``)."""
    return str(subject).split(SEPARATOR, 1)[0]
