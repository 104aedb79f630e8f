"""Run by `torchrun --nproc_per_node 2` from tests/test_trainer.py: trains the toy task with DDP."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from training_toy import ToyTask, toy_recipe  # noqa: E402

from fer_core.training.trainer import Trainer  # noqa: E402

run_dir = Path(sys.argv[1])
torch.set_num_threads(1)
trainer = Trainer(toy_recipe(), ToyTask(), run_dir)
result = trainer.fit()
if trainer.is_main:
    (run_dir / "result.json").write_text(json.dumps({"history": result.history}))
