"""mtmm-report on a real tiny run (with gradient conflict logged and a real robustness evaluation) and on a two-job
sweep: the page parses, every image it shows is a real PNG with something drawn on it, the tables hold summary.json's
numbers as the report prints them; the Pareto front by hand; bad input ends in one line naming the file."""

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.report.cli import OPTIONS, main, report
from mtmm.report.pareto import pareto_front
from mtmm.train import train
from tests.conftest import TINY

LIGHT = shutil.ignore_patterns("checkpoints", "tokenizer")  # what a report never reads: keep copies small


def compose_tiny(folder, *overrides):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.source.cache_dir={folder / 'data'}", *TINY, *overrides])


def add_overrides(folder: Path, overrides: list[str]) -> None:
    """What Hydra writes for a job of mtmm-train -m (an in-process run gets none)."""
    (folder / ".hydra").mkdir(exist_ok=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))


def baseline(run: Path, folder: Path, task: str, accuracy: float) -> None:
    """A single-task baseline made from `run`: its config trains only `task`, with a known best test accuracy."""
    shutil.copytree(run, folder, ignore=LIGHT)
    cfg = OmegaConf.load(folder / "config.yaml")
    cfg.tasks = {task: cfg.tasks[task]}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    summary = json.loads((folder / "summary.json").read_text())
    summary["best"]["test"] = {task: {**summary["best"]["test"][task], "accuracy": accuracy}}
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trainings: `run` (loss=static, conflict logged every 2 steps, evaluated for robustness) and a
    second with loss=uncertainty; a sweep of the two (jobs 0/ and 1/) and two hand-made single-task baselines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    train(compose_tiny(root, "trainer.log_conflict_every=2"), run_dir=root / "run")
    train(compose_tiny(root, "loss=uncertainty"), run_dir=root / "sweep" / "1")
    add_overrides(root / "sweep" / "1", ["loss=uncertainty", "trainer.epochs=2"])
    shutil.copytree(root / "run", root / "sweep" / "0", ignore=LIGHT)
    add_overrides(root / "sweep" / "0", ["loss=static", "trainer.epochs=2"])
    evaluate_checkpoint(root / "run" / "checkpoints" / "best.pt", run_dir=root / "eval", device="cpu",
                        robustness=True, levels=(0.0, 1.0), cache_dir=root / "cache")
    baseline(root / "run", root / "baselines" / "0", "img", 0.5)
    baseline(root / "run", root / "baselines" / "1", "txt", 0.25)
    torch.set_num_threads(threads)
    return root


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


class Page(HTMLParser):
    """The images, links and tables of a page, checking on the way that every element is closed in order."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.tables, self.open, self.cell = [], [], [], [], None
        self.feed(text)
        self.close()
        assert self.open == [], f"unclosed {self.open}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def rows(self) -> list[list[str]]:
        return [row for table in self.tables for row in table]


def drawn_png(data: bytes) -> None:
    """A PNG with more than one colour: a figure was drawn, not a blank canvas."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        assert len(image.convert("RGB").getcolors(1 << 24)) > 1


def html_images(page: Page, folder: Path) -> set[str]:
    """Each embedded image decodes to a drawn PNG equal to the file beside the page that the caption links to."""
    names = {href for href in page.links if href.endswith(".png")}
    assert len(page.images) == len(names)
    embedded = set()
    for image in page.images:
        assert image["src"].startswith("data:image/png;base64,")
        data = base64.b64decode(image["src"].split(",", 1)[1], validate=True)
        drawn_png(data)
        embedded.add(data)
    assert embedded == {(folder / name).read_bytes() for name in names}
    return names


def options(**given) -> dict:
    return {**OPTIONS, **{key: str(value) for key, value in given.items()}}


def test_run_report_html(runs):
    run = runs / "run"
    path = report(run, options(robustness=runs / "eval" / "robustness.json"))
    assert path == run / "report.html"
    page = Page(path.read_text())
    assert html_images(page, run) == {"loss.png", "weights.png", "lr.png", "val.png", "conflict.png",
                                      "robustness.png"}
    rows, done = page.rows(), summary(run)
    assert ["task", "metric", "last (epoch 2)", f"best (epoch {done['best']['epoch']})"] in rows
    for task, values in done["best"]["test"].items():
        for metric, value in values.items():
            if metric != "count":
                assert [task, metric, f"{done['final']['test'][task][metric]:.4f}", f"{value:.4f}"] in rows
    assert ["optimizer steps", "6"] in rows and ["loss weighting", "static"] in rows
    assert ["monitor", f"val/mean/accuracy = {done['monitor_value']:.4f}"] in rows
    conflict = done["gradient_conflict"]["img~txt"]
    assert ["img vs txt", "3", f"{conflict['conflict_share']:.4f}", f"{conflict['mean_cosine']:.4f}",
            f"{conflict['mean_norm_ratio']:.4f}"] in rows
    robustness = json.loads((runs / "eval" / "robustness.json").read_text())
    header, *lines = page.tables[-1]
    assert header == ["task", "metric", "clean", "image missing", "text missing", *(
        f"{kind} (relative AUC)" for kind in ("gaussian_noise", "blur", "char_swap", "typo", "word_drop"))]
    for line, task in zip(lines, ("img", "txt")):
        assert line[:4] == [task, "accuracy", f"{robustness['clean'][task]['accuracy']:.4f}",
                            f"{robustness['missing']['image'][task]['accuracy']:.4f}"]


def test_run_report_markdown_into_a_new_folder(runs, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(runs / "run"), "format=md", f"out={out}", f"baselines={runs / 'baselines'}"])
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    test = summary(runs / "run")["best"]["test"]
    delta = 100 * ((test["img"]["accuracy"] - 0.5) / 0.5 + (test["txt"]["accuracy"] - 0.25) / 0.25) / 2
    assert f"Δm against the single-task baselines in {runs / 'baselines'}: {delta:+.2f} % (primary metrics of " \
           f"img, txt; test split, best checkpoints)" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert sorted(links) == ["conflict.png", "loss.png", "lr.png", "val.png", "weights.png"]  # no robustness.json
    for name in links:
        drawn_png((out / name).read_bytes())
    best = summary(runs / "run")["best"]["test"]
    assert f"| txt | accuracy | {best['txt']['accuracy']:.4f} | {best['txt']['accuracy']:.4f} |" in text
    main([str(runs / "run"), "format=md", f"out={out}"])  # a folder mtmm-report made may be written again


def test_sweep_report_rows_delta_m_and_pareto(runs):
    sweep = runs / "sweep"
    path = report(sweep, options(baselines=runs / "baselines"))
    page = Page(path.read_text())
    assert html_images(page, sweep) == {"sweep_metrics.png", "pareto.png"}
    table = page.tables[0]
    assert table[0] == ["job", "overrides", "img/accuracy", "img/macro_f1", "txt/accuracy", "txt/macro_f1",
                        "mean/accuracy", "Δm %", "s/step"]
    points = []
    for row, job, name in zip(table[1:], ("0", "1"), ("loss=static", "loss=uncertainty")):
        done = summary(sweep / job)
        test = done["best"]["test"]
        delta = 100 * ((test["img"]["accuracy"] - 0.5) / 0.5 + (test["txt"]["accuracy"] - 0.25) / 0.25) / 2
        assert row == [job, name, f"{test['img']['accuracy']:.4f}", f"{test['img']['macro_f1']:.4f}",
                       f"{test['txt']['accuracy']:.4f}", f"{test['txt']['macro_f1']:.4f}",
                       f"{test['mean']['accuracy']:.4f}", f"{delta:+.2f}", f"{done['wall_time_s'] / 6:.3g}"]
        points.append((test["img"]["accuracy"], test["txt"]["accuracy"]))
    (a, b), (c, d) = points
    front = [job for job, (mine, other) in (("0", ((a, b), (c, d))), ("1", ((c, d), (a, b))))
             if not (other[0] >= mine[0] and other[1] >= mine[1] and other != mine)]
    assert f"On the Pareto front (no other job is at least as good on both and better on one): job " \
           f"{', '.join(front)}." in path.read_text()


def test_sweep_report_markdown_table_is_ready_to_paste(runs, tmp_path):
    path = report(runs / "sweep", options(format="md", out=tmp_path / "md", tasks="txt,img"))
    lines = path.read_text().splitlines()
    header = lines.index("| job | overrides | img/accuracy | img/macro_f1 | txt/accuracy | txt/macro_f1 | "
                         "mean/accuracy | s/step |")
    assert lines[header + 1] == "|---|---|---|---|---|---|---|---|"
    best = summary(runs / "sweep" / "1")["best"]["test"]
    assert lines[header + 3].startswith(f"| 1 | loss=uncertainty | {best['img']['accuracy']:.4f} | ")
    assert "## txt against img" in lines and "![each job's txt/accuracy and img/accuracy; ringed and joined: " \
        "the Pareto front](pareto.png)" in lines
    drawn_png((tmp_path / "md" / "pareto.png").read_bytes())


def test_pareto_front_by_hand():
    points = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9)]  # (0.4, 0.4) is beaten by (0.5, 0.5) on both
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front(points, higher_is_better=(True, False)) == [0]  # highest x and lowest y at once
    assert pareto_front(points, higher_is_better=(False, False)) == [0, 2, 3]  # (0.5, 0.5) is beaten by (0.4, 0.4)
    assert pareto_front([(0.5, 0.5), (0.5, 0.5), (0.5, 0.4)]) == [0, 1]  # equals do not dominate each other
    assert pareto_front([(None, 1.0), (0.2, float("nan")), (0.1, 0.1)]) == [2]  # missing values are never on it


def copy_run(runs: Path, folder: Path) -> Path:
    shutil.copytree(runs / "run", folder, ignore=shutil.ignore_patterns("checkpoints", "tokenizer", "*.png",
                                                                       "report.*"))
    return folder


def test_bad_input_is_one_error_naming_the_file(runs, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("nothing here")
    with pytest.raises(UserError, match="is neither a run folder .* nor a sweep folder"):
        report(tmp_path / "notes", options())
    with pytest.raises(UserError, match="is not a folder"):
        report(tmp_path / "nowhere", options())
    with pytest.raises(UserError, match="is an mtmm-eval folder, not a run; .* add robustness="):
        report(runs / "eval", options())

    broken = copy_run(runs, tmp_path / "broken")
    (broken / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match=f"cannot read {broken / 'summary.json'}: Expecting property name"):
        report(broken, options())
    (broken / "summary.json").unlink()
    with pytest.raises(UserError, match=f"cannot read {broken / 'summary.json'}: there is no such file"):
        report(broken, options())

    corrupt = copy_run(runs, tmp_path / "corrupt")
    lines = (corrupt / "metrics.jsonl").read_text().splitlines()
    (corrupt / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[2][:20], *lines[3:]]) + "\n")
    with pytest.raises(UserError, match=f"cannot read {corrupt / 'metrics.jsonl'} line 3: "):
        report(corrupt, options())

    (tmp_path / "bad.json").write_text('{"clean": {}}')
    with pytest.raises(UserError, match="bad.json is not a robustness.json .*no primary, missing, corruptions"):
        report(copy_run(runs, tmp_path / "robust"), options(robustness=tmp_path / "bad.json"))
    with pytest.raises(UserError, match="'nope' is not a task of these runs"):
        report(runs / "sweep", options(tasks="img,nope", out=tmp_path / "t"))
    with pytest.raises(UserError, match="tasks= picks the two tasks of a sweep"):
        report(runs / "run", options(tasks="img,txt"))


def test_never_writes_into_a_folder_mtmm_did_not_make(runs, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "paper.tex").write_text("mine")
    with pytest.raises(UserError, match=r"out=.*theirs holds files mtmm did not write \(paper.tex\)"):
        report(runs / "run", options(out=theirs))
    assert [path.name for path in theirs.iterdir()] == ["paper.tex"]
    for job in ("0", "1"):  # the jobs only: an earlier report's files (and its marker) stay behind
        shutil.copytree(runs / "sweep" / job, tmp_path / "collected" / job, ignore=LIGHT)
    (tmp_path / "collected" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are not mtmm runs; give out=DIR"):
        report(tmp_path / "collected", options())
    (tmp_path / "collected" / "notes.txt").unlink()
    for _ in range(2):  # a sweep folder of mtmm runs takes the report, and the report again
        assert report(tmp_path / "collected", options(format="md")) == tmp_path / "collected" / "report.md"


def test_command_line_errors_exit_2_with_one_line(runs, tmp_path):
    def fails(*args, match):
        result = subprocess.run([sys.executable, "-m", "mtmm.report.cli", *map(str, args)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and match in result.stderr, result.stderr

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", match=f"error: {tmp_path / 'empty'} is neither a run folder")
    fails(runs / "run", "colour=red", match="unknown option 'colour'; use format=, out=")
    fails(runs / "run", "format=pdf", match="format=pdf: use format=html or md")
    fails(match="give one run or sweep folder (0 given)")
