"""TensorBoard event files in the run folder, through torch.utils.tensorboard (the real `tensorboard` package)."""

from pathlib import Path

from mtmm.loggers import Resume, flat_params, record_step, require, scalars


class TensorBoardTracker:
    """Scalars per record; the config as hyper-parameters and as text; the best checkpoint's path as text. A resumed
    run writes with purge_step = the checkpoint's step + 1, so TensorBoard drops what the stopped run logged after it,
    and skips the points up to that step it already holds (the test records of a run continued to more epochs)."""

    def __init__(self, run_dir: Path, config: dict, resume: Resume | None, dir: str = "tensorboard"):
        require("tensorboard", "tensorboard")
        tb = require("torch.utils.tensorboard", "tensorboard")
        summary = require("torch.utils.tensorboard.summary", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir=str(Path(run_dir) / dir),
                                       purge_step=resume.step + 1 if resume is not None else None)
        self.last_step = resume.step if resume is not None else 0
        self.kept = {(name, step) for name, step in resume.sent if step <= resume.step} if resume is not None else set()
        if resume is None:
            params = {k: v for k, v in flat_params(config).items() if isinstance(v, (int, float, str, bool))}
            for part in summary.hparams(params, {}):
                self.writer.file_writer.add_summary(part)
            import yaml
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def log(self, record: dict, index: int) -> None:
        step = record_step(record, self.last_step)
        self.last_step = max(self.last_step, step)
        for name, value in scalars(record).items():
            if (name, step) not in self.kept:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        best = (summary.get("checkpoints") or {}).get("best")
        if best:
            self.writer.add_text("best_checkpoint", best, self.last_step)

    def close(self) -> None:
        self.writer.close()
