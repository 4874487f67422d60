"""Every scalar of metrics.jsonl as one CSV row (long format: record,step,epoch,split,name,value)."""

import csv
from pathlib import Path

from mtmm.loggers import Resume, scalars

HEADER = ["record", "step", "epoch", "split", "name", "value"]


class CSVTracker:
    """A resumed run cuts the file to the records metrics.jsonl keeps (column `record` = its line number)."""

    def __init__(self, run_dir: Path, config: dict, resume: Resume | None, file: str = "metrics.csv"):
        self.path = Path(run_dir) / file
        if resume is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.reader(handle)][1:]
            kept = [row for row in rows if row and int(row[0]) < resume.kept]
            with self.path.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([HEADER, *kept])
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.file = self.path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(HEADER)

    def log(self, record: dict, index: int) -> None:
        for name, value in scalars(record).items():
            self.writer.writerow([index, record.get("step"), record.get("epoch"), record["split"], name, repr(value)])
        self.file.flush()

    def finish(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        self.file.close()
