"""MLflow: by default a local SQLite store in <run folder>/mlflow.db (nothing leaves the machine; MLflow 3 no longer
accepts a plain file store), logger.mlflow.tracking_uri for a server. The MLflow run id is kept in
<run folder>/mlflow-run-id, so a resumed run continues the same MLflow run."""

import time
from pathlib import Path

from mtmm.loggers import Resume, flat_params, record_step, require, scalars

ID_FILE = "mlflow-run-id"


class MLflowTracker:
    """MLflow's metric history is append-only: on resume the points it already holds (metrics.jsonl's records past
    the checkpoint, written again with the same values) are not sent again."""

    def __init__(self, run_dir: Path, config: dict, resume: Resume | None, tracking_uri: str | None = None,
                 experiment: str = "mtmm", run_name: str | None = None):
        mlflow = require("mlflow", "mlflow")
        self.entities = mlflow.entities
        run_dir = Path(run_dir).resolve()
        self.uri = tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.sent = resume.sent if resume is not None else set()
        self.last_step = resume.step if resume is not None else 0
        id_file = run_dir / ID_FILE
        if resume is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name or run_dir.name).info.run_id
        id_file.write_text(self.run_id + "\n")
        # MLflow caps a param's value at 6000 characters and a batch at 100 params
        params = [self.entities.Param(k, str(v)[:6000]) for k, v in flat_params(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, record: dict, index: int) -> None:
        step = record_step(record, self.last_step)
        self.last_step = max(self.last_step, step)
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(name, value, now, step) for name, value in scalars(record).items()
                   if (name, step) not in self.sent]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict) -> None:
        best = (summary.get("checkpoints") or {}).get("best")
        if best:
            self.client.set_tag(self.run_id, "best_checkpoint", best)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
