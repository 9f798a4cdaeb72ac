"""``gradguard.json`` on disk: written atomically, never through a link, and a disk problem is a clear warning.

The report file is what CI reads. It must never be seen half-written (a reader racing the writer, a killed run),
a symbolic link left at its place must be replaced rather than followed (the link's target is someone else's
file), and a problem of the environment (a read-only or full disk, a path that is a file) must say what is wrong
and where, and let the run end normally.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import warnings

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from models import HealthyMLP, RegressionData, gradguard_warnings
from test_cli_inputs import planted_report

from lightning_gradguard import GradGuard, GradGuardWarning
from lightning_gradguard.output.sinks.json_file import write_report
from lightning_gradguard.report import REPORT_FILENAME, GradReport


@pytest.fixture(scope="module")
def report() -> GradReport:
    return planted_report()


def test_a_link_at_the_destination_is_replaced_and_its_target_untouched(report, tmp_path):
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir()
    target.write_text("someone else's file")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / REPORT_FILENAME)
    path = write_report(report, str(run))
    assert path == str(run / REPORT_FILENAME)
    assert target.read_text() == "someone else's file"
    assert not os.path.islink(path) and GradReport.load(path).to_dict() == report.to_dict()
    assert sorted(os.listdir(run)) == [REPORT_FILENAME]  # no temporary file left behind
    elsewhere = tmp_path / "elsewhere"  # a link to a directory at the file's place: replaced, not written through
    os.remove(run / REPORT_FILENAME)
    os.symlink(elsewhere, run / REPORT_FILENAME)
    assert write_report(report, str(run)) == str(run / REPORT_FILENAME)
    assert os.listdir(elsewhere) == ["precious.txt"] and not os.path.islink(run / REPORT_FILENAME)
    os.symlink(target, tmp_path / "direct.json")  # GradReport.save on the link's own path: the same
    report.save(tmp_path / "direct.json")
    assert target.read_text() == "someone else's file" and not os.path.islink(tmp_path / "direct.json")


def test_the_file_is_as_readable_as_any_other(report, tmp_path):
    old = os.umask(0o027)
    try:
        path = report.save(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640  # what open() would have made, not mkstemp's private 0o600


N_RACED = 3000


def test_a_reader_never_sees_half_a_report(tmp_path):
    """A reader racing a writer that rewrites a 400 KB report reads a whole report every time."""
    big = GradReport.from_dict(
        {"steps": 3, "micro_batches": 3, "params": {f"layer.{i}.weight": {"steps": 3} for i in range(N_RACED)}}
    )
    path = str(tmp_path / REPORT_FILENAME)
    big.save(path)
    done = threading.Event()
    reads, errors = [0], []

    def reader() -> None:
        while not done.is_set():
            try:
                with open(path, encoding="utf-8") as f:
                    assert len(json.load(f)["params"]) == N_RACED
                reads[0] += 1
            except (ValueError, AssertionError) as err:  # a partial file
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(15):
            big.save(path)
    finally:
        done.set()
        thread.join()
    assert errors == [] and reads[0] > 0
    assert os.listdir(tmp_path) == [REPORT_FILENAME]


# ---------------------------------------------------------------------------------------------- environment problems
def write_and_warn(report: GradReport, directory: str) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert write_report(report, directory) is None
    (warning,) = [w for w in caught if issubclass(w.category, GradGuardWarning)]
    text = str(warning.message)
    assert "report this" not in text.lower() and "internal error" not in text
    assert text.startswith(f"GradGuard: could not write the report to {os.path.join(directory, REPORT_FILENAME)}: ")
    return text


def test_a_path_that_is_a_file(report, tmp_path):
    (tmp_path / "logs").write_text("a file where the log directory should be")
    text = write_and_warn(report, str(tmp_path / "logs"))
    assert "a part of the path is a file, not a directory" in text
    text = write_and_warn(report, str(tmp_path / "logs" / "version_0"))
    assert "a part of the path is a file, not a directory" in text


def test_a_directory_where_the_file_should_be(report, tmp_path):
    (tmp_path / REPORT_FILENAME / "inside").mkdir(parents=True)
    text = write_and_warn(report, str(tmp_path))
    assert "the path is a directory" in text
    assert sorted(os.listdir(tmp_path)) == [REPORT_FILENAME]  # the temporary file is gone


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes whatever the mode")
def test_a_directory_without_write_permission(report, tmp_path):
    tmp_path.chmod(0o500)
    try:
        text = write_and_warn(report, str(tmp_path))
    finally:
        tmp_path.chmod(0o700)
    assert "no permission to write there" in text


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a 64 KiB tmpfs (the test skips where mounting is not allowed); yields (directory, mount options)."""
    mounted = []

    def mount(options: str) -> str:
        directory = tmp_path / f"mnt{len(mounted)}"
        directory.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
        mounted.append(directory)
        return str(directory)

    yield mount
    for directory in mounted:
        subprocess.run(["umount", str(directory)], capture_output=True)


def test_a_read_only_file_system(report, small_tmpfs):
    directory = small_tmpfs("size=64k,ro")
    text = write_and_warn(report, directory)
    assert "the file system is read-only" in text


def test_a_full_disk(report, small_tmpfs):
    directory = small_tmpfs("size=64k")
    with open(os.path.join(directory, "filler"), "wb") as f:
        try:
            f.write(bytes(1 << 20))
        except OSError:
            pass
    big = GradReport.from_dict(
        {"steps": 1, "micro_batches": 1, "params": {f"p{i}": {"steps": 1} for i in range(2000)}}
    )
    text = write_and_warn(big, directory)
    assert "the disk is full" in text
    assert sorted(os.listdir(directory)) == ["filler"]  # no half-written report, no temporary file


def test_a_trainer_run_ends_normally_when_the_file_cannot_be_written(tmp_path, make_trainer, capsys):
    """The end of a real fit: the summary is printed, one warning names the path and the problem, nothing raises."""
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    os.makedirs(os.path.join(logger.log_dir, REPORT_FILENAME, "in-the-way"))
    guard = GradGuard()
    trainer = make_trainer(callbacks=[guard], logger=logger, log_every_n_steps=1)
    with pytest.warns(GradGuardWarning) as record:
        trainer.fit(HealthyMLP(), RegressionData(n_batches=3))
    (message,) = gradguard_warnings(record)
    path = os.path.join(logger.log_dir, REPORT_FILENAME)
    assert message.startswith(f"GradGuard: could not write the report to {path}: the path is a directory")
    assert "report this" not in message
    assert guard.report_path is None
    assert "all 6 trainable parameters received a gradient at each of 3 optimizer steps" in capsys.readouterr().out


class _RaisesAtBatch(HealthyMLP):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def training_step(self, batch, batch_idx):
        if batch_idx == 3:
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), ValueError("a bug in training_step")],
                         ids=["ctrl-c", "crash"])
def test_a_run_that_raises_leaves_the_report_so_far(make_trainer, tmp_path, capsys, error):
    # Ctrl-C (Lightning's graceful shutdown exits the process) or a crash: `gradguard report` still has a file to read
    guard = GradGuard()
    trainer = make_trainer(callbacks=[guard], logger=TensorBoardLogger(str(tmp_path), name="run"), max_epochs=1)
    with warnings.catch_warnings(), pytest.raises((SystemExit, ValueError)) as raised:
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(_RaisesAtBatch(error), RegressionData())
    if isinstance(error, ValueError):
        assert raised.value is error  # the user's exception, untouched
    assert guard.report_path == str(tmp_path / "run" / "version_0" / REPORT_FILENAME)
    saved = GradReport.load(guard.report_path)
    assert saved.steps == 3 and saved.to_dict() == guard.report().to_dict()
    said = capsys.readouterr().out
    assert ("the report so far is in" in said) == isinstance(error, KeyboardInterrupt)
