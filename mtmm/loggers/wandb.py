"""Weights & Biases, offline by default (files under <run folder>/wandb; `wandb sync` uploads them). The run id is
kept in <run folder>/wandb-run-id, so a resumed run continues the same W&B run."""

import os
import uuid
from pathlib import Path

from mtmm.loggers import Resume, record_step, require, scalars

ID_FILE = "wandb-run-id"


class WandbTracker:
    """W&B history is append-only: on resume the points it already holds are not sent again."""

    def __init__(self, run_dir: Path, config: dict, resume: Resume | None, mode: str = "offline",
                 project: str = "mtmm", entity: str | None = None, run_name: str | None = None):
        wandb = require("wandb", "wandb")
        run_dir = Path(run_dir).resolve()
        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.sent = resume.sent if resume is not None else set()
        self.last_step = resume.step if resume is not None else 0
        if mode == "offline":
            os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity, id=run_id,
                              name=run_name or run_dir.name, resume="allow", config=config,
                              settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True,
                                                      silent=True))

    def log(self, record: dict, index: int) -> None:
        step = record_step(record, self.last_step)
        self.last_step = max(self.last_step, step)
        values = {name: value for name, value in scalars(record).items() if (name, step) not in self.sent}
        if values:
            self.run.log({**values, "trainer/step": step, "trainer/record": index})

    def finish(self, summary: dict) -> None:
        best = (summary.get("checkpoints") or {}).get("best")
        if best:
            self.run.summary["best_checkpoint"] = best

    def close(self) -> None:
        self.run.finish()
