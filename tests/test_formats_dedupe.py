"""The generic cross-split de-duplication option of ``adapt``."""

import numpy as np
import pandas as pd

from fer_core.data.formats import adapt
from fer_core.data.manifest import read_card, read_manifest


def test_drop_cross_split_duplicates_keeps_the_train_copy(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 48 * 48))
    pixels[4] = pixels[0]  # PublicTest row 4 repeats Training row 0
    pixels[5] = pixels[4]  # PrivateTest row 5 repeats it too
    usage = ["Training", "Training", "Training", "PublicTest", "PublicTest", "PrivateTest"]
    csv = tmp_path / "fer2013.csv"
    pd.DataFrame({"emotion": [0, 1, 2, 3, 0, 0], "pixels": [" ".join(map(str, p)) for p in pixels],
                  "Usage": usage}).to_csv(csv, index=False)
    card = adapt("fer2013", csv, tmp_path / "plain", name="x")
    assert card.num_samples == 6
    card = adapt("fer2013", csv, tmp_path / "dedup", name="x", drop_cross_split_duplicates=True)
    df = read_manifest(tmp_path / "dedup")
    assert card.num_samples == len(df) == 4
    assert sorted(df["split"]) == ["train", "train", "train", "val"]
    assert read_card(tmp_path / "dedup").provenance["dropped_cross_split_duplicates"] == 2
    assert card.counts["val"]["happy"] == 1 and card.counts["val"].get("angry", 0) == 0
