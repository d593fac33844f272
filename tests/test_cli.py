"""CLI contract: help, README coverage, light import, output modes, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipsearch.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)  # type: ignore[union-attr]
runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"clipsearch {command}" in README.read_text()


def test_importing_the_cli_stays_light() -> None:
    code = ("import sys, clipsearch.cli; heavy = {'torch', 'open_clip', 'faiss', 'sqlalchemy', "
            "'numpy'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_query_commands_run_numpy_with_one_blas_thread() -> None:
    """The numpy text tower is ~6x slower per query with OpenBLAS's threads on 2 cores; the
    setting only works if nothing imported numpy before the query command starts."""
    pytest.importorskip("threadpoolctl")
    code = ("import os, clipsearch.cli as c; os.environ.pop('OPENBLAS_NUM_THREADS', None); "
            "c._one_blas_thread_for_queries(); import numpy, threadpoolctl; "
            "print([i['num_threads'] for i in threadpoolctl.threadpool_info() "
            "if i['internal_api'] == 'openblas'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1]"


@pytest.fixture
def indexed_db(tmp_path: Path, make_image, tiny_model: str) -> Path:  # type: ignore[no-untyped-def]
    for i in range(5):
        make_image(f"{i}.png", seed=i)
    db = tmp_path / "cli.sqlite3"
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", str(db),
                                 "--model", tiny_model, "-q"])
    assert result.exit_code == 0, result.output
    return db


def test_index_then_search_outputs(indexed_db: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["search", "a red thing", "--db", str(indexed_db), "--json", "-k", "3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
    res = runner.invoke(app, ["search", "x", "--db", str(indexed_db), "--paths", "-k", "10"])
    assert sorted(res.stdout.split()) == sorted(str(p) for p in (tmp_path / "photos").iterdir())
    res = runner.invoke(app, ["search", "x", "--db", str(indexed_db), "--paths", "-0", "-k", "2"])
    assert res.stdout.count("\0") == 2
    res = runner.invoke(app, ["similar", str(tmp_path / "photos" / "0.png"), "--db",
                              str(indexed_db), "--paths"])
    assert res.exit_code == 0 and str(tmp_path / "photos" / "0.png") not in res.stdout
    res = runner.invoke(app, ["status", "--db", str(indexed_db), "--json"])
    data = json.loads(res.stdout)
    assert data["counts"]["indexed"] == 5 and data["index"]["fresh"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["search", "cat", "--db", "{tmp}/none.sqlite3"], "no catalogue"),
        (["search", "", "--db", "{db}"], "empty query"),
        (["search", "cat", "--db", "{db}", "--since", "last week"], "bad date"),
        (["index", "{tmp}/missing-folder", "--db", "{tmp}/new.sqlite3", "--model",
          "{tmp}/no-model"], "not found"),
        (["similar", "{tmp}/nothing.png", "--db", "{db}"], "no such file"),
    ],
)
def test_errors_are_one_line_with_exit_1(indexed_db: Path, tmp_path: Path, args: list[str],
                                         needle: str) -> None:
    argv = [a.format(tmp=tmp_path, db=indexed_db) for a in args]
    res = runner.invoke(app, argv)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert needle in res.output and "error:" in res.output


def test_index_with_another_model_is_refused(indexed_db: Path, tmp_path: Path) -> None:
    from tests.conftest import save_tiny_model

    other = save_tiny_model(tmp_path / "other", seed=9)
    res = runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", str(indexed_db),
                              "--model", str(other), "-q"])
    assert res.exit_code == 1 and "hint:" in res.output


@pytest.mark.parametrize("args,needle", [
    (["index", "{tmp}", "--workers", "-1"], "--workers"),
    (["train", "{tmp}", "--captions", "{tmp}/c.csv", "--out", "{tmp}/o", "--batch-size", "0"],
     "--batch-size"),
    (["train", "{tmp}", "--captions", "{tmp}/c.csv", "--out", "{tmp}/o", "--steps", "0"],
     "--steps"),
])
def test_impossible_numbers_are_usage_errors(args: list[str], needle: str, tmp_path: Path) -> None:
    """A negative worker count used to hang `index`; a zero batch size made `train` eat
    memory until killed."""
    from typer.testing import CliRunner

    from clipsearch.cli import app

    res = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2 and needle in res.output


def test_library_refuses_impossible_settings_and_training_configs(tmp_path: Path) -> None:
    from clipsearch.config import resolve_settings
    from clipsearch.errors import UsageError
    from clipsearch.training import TrainConfig, TrainingError, train_model

    with pytest.raises(UsageError):
        resolve_settings(db=tmp_path / "c.sqlite3", workers=-1)
    with pytest.raises(TrainingError, match="batch size"):
        train_model(None, {}, tmp_path, [], TrainConfig(steps=1, batch_size=0))


@pytest.mark.parametrize("extra,needle", [
    (["--margin", "-1"], "--margin"),
    (["--margin", "nan"], "--margin"),
    (["--format", "NOPE"], "unknown format"),
    (["--since", "2024-01", "--until", "2020-01"], "before --since"),
    (["--folder", "/no/such/folder"], "no such folder"),
])
def test_search_filters_that_match_nothing_by_construction_are_errors(
    extra: list[str], needle: str, settings, make_image, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.indexer import run_index

    make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    res = CliRunner().invoke(app, ["search", "cat", "--db", str(settings.db_path), *extra])
    assert res.exit_code == 1 and needle in res.output


def test_similar_of_a_folder_and_classify_of_a_bad_file_name_the_path(
    settings, make_image, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from typer.testing import CliRunner

    from clipsearch.cli import app
    from clipsearch.indexer import run_index

    good = make_image("a.png")
    run_index(settings, [str(tmp_path / "photos")])
    db = ["--db", str(settings.db_path)]
    res = CliRunner().invoke(app, ["similar", str(tmp_path / "photos"), *db])
    assert res.exit_code == 1 and "is a folder" in res.output
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"not an image at all")
    res = CliRunner().invoke(app, ["classify", "--labels", "cat,dog", str(good), str(bad),
                                   "--json", *db])
    assert res.exit_code == 1
    assert str(bad) in res.output and str(good) in res.output  # the good one still classified


def test_json_paths_are_exact_for_names_that_are_not_utf8(tmp_path: Path, make_image,  # type: ignore[no-untyped-def]
                                                          tiny_model: str) -> None:
    import base64

    folder = tmp_path / "photos"
    make_image("plain.png", seed=1)
    odd = make_image("odd.png", seed=2)
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    os.rename(odd, raw)
    literal = make_image("caf\\xe9.png", seed=3)  # the four characters \ x e 9
    db = tmp_path / "j.sqlite3"
    res = runner.invoke(app, ["index", str(folder), "--db", str(db), "--model", tiny_model, "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["search", "x", "--db", str(db), "--json", "-k", "10"])
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    exact = {base64.b64decode(r["path_base64"]) if "path_base64" in r else os.fsencode(r["path"])
             for r in rows}
    assert exact == {raw, os.fsencode(literal), os.fsencode(folder / "plain.png")}
    # The printable forms collide; only the non-UTF-8 one carries its bytes.
    assert sum("path_base64" in r for r in rows) == 1
    status = json.loads(runner.invoke(app, ["status", "--db", str(db), "--json"]).stdout)
    assert status["roots"] == [{"path": str(folder)}]
    bad_root = os.fsencode(tmp_path) + b"/r\xff"
    os.rename(folder, bad_root)
    runner.invoke(app, ["index", os.fsdecode(bad_root), "--db", str(db), "-q"])
    status = json.loads(runner.invoke(app, ["status", "--db", str(db), "--json"]).stdout)
    assert base64.b64decode(status["roots"][-1]["path_base64"]) == bad_root


def test_index_of_a_missing_folder_creates_no_catalogue(tmp_path: Path) -> None:
    db = tmp_path / "new" / "c.sqlite3"
    res = runner.invoke(app, ["index", str(tmp_path / "nope"), "--db", str(db)])
    assert res.exit_code == 1
    assert "nope: not found" in res.stderr
    assert not db.exists() and not db.parent.exists()


def test_a_run_where_every_file_fails_exits_non_zero(tmp_path: Path, tiny_model: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * i)
    db = tmp_path / "c.sqlite3"
    res = runner.invoke(app, ["index", str(folder), "--db", str(db), "--model", tiny_model, "-q"])
    assert res.exit_code == 1, res.output
    assert "none of the 3 files" in res.stderr
    # With one good file among them the run succeeded (the bad ones are reported).
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(folder / "ok.png")
    res = runner.invoke(app, ["index", str(folder), "--db", str(db), "--model", tiny_model, "-q"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("query, message", [("0:cat", "weight 0"), ("-cat", "only negative"),
                                            ("dog 0:cat", "weight 0")])
def test_weights_that_cannot_work_are_usage_errors(indexed_db: Path, query: str,
                                                   message: str) -> None:
    res = runner.invoke(app, ["search", "--db", str(indexed_db), "--", query])
    assert res.exit_code != 0 and message in res.stderr, res.output


def test_interrupt_messages_say_what_happened_per_command(monkeypatch, indexed_db: Path) -> None:  # type: ignore[no-untyped-def]
    from clipsearch import search as search_mod

    def stop(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(search_mod, "search", stop)
    res = runner.invoke(app, ["search", "cat", "--db", str(indexed_db)])
    assert res.exit_code == 130
    assert "nothing was changed" in res.stderr and "batches" not in res.stderr


@pytest.mark.parametrize("query, message", [("9" * 400 + ":cat", "too large"),
                                            ("0.0000001:cat", "which would ignore it")])
def test_weights_out_of_range_are_usage_errors(indexed_db: Path, query: str, message: str) -> None:
    res = runner.invoke(app, ["search", "--db", str(indexed_db), "--", query])
    assert res.exit_code == 1 and message in res.stderr, res.output


def test_similar_on_a_file_that_is_not_an_image_fails_before_loading_the_model(  # type: ignore[no-untyped-def]
        indexed_db: Path, tmp_path: Path, monkeypatch) -> None:
    from clipsearch import search as search_mod

    def no_model(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the image model was loaded")

    monkeypatch.setattr(search_mod._Session, "encoder", no_model)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    res = runner.invoke(app, ["similar", str(text), "--db", str(indexed_db)])
    assert res.exit_code == 1 and "not an image" in res.stderr, res.output


def test_help_shows_environment_variables_and_defaults() -> None:
    res = runner.invoke(app, ["search", "--help"], env={"COLUMNS": "200"})
    assert "[env: CLIPSEARCH_DB;" in res.stdout and "[default: 10]" in res.stdout


def test_piped_tables_do_not_fold_paths(tmp_path: Path, make_image, tiny_model: str) -> None:  # type: ignore[no-untyped-def]
    deep = "a-rather-long-folder-name/" * 4
    make_image(deep + "picture-with-a-long-name.png")
    db = tmp_path / "t.sqlite3"
    runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", str(db), "--model", tiny_model,
                        "-q"])
    res = runner.invoke(app, ["search", "x", "--db", str(db)])
    assert res.exit_code == 0
    assert str(tmp_path / "photos" / deep / "picture-with-a-long-name.png") in res.stdout


def test_a_rerun_still_shows_the_files_that_failed_before(tmp_path: Path, tiny_model: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * (i + 1))
    db = tmp_path / "c.sqlite3"
    args = ["index", str(folder), "--db", str(db), "--model", tiny_model, "-q"]
    assert runner.invoke(app, args).exit_code == 1
    res = runner.invoke(app, args + ["--json"])
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["unchanged"] == 2 and report["still_failed"] == 2 and report["failed_total"] == 0
    assert "failed before" in runner.invoke(app, args[:-1]).stderr


def test_a_first_index_whose_model_cannot_load_leaves_no_catalogue(tmp_path: Path, make_image) -> None:  # type: ignore[no-untyped-def]
    make_image("a.png")
    db = tmp_path / "fresh" / "c.sqlite3"
    res = runner.invoke(app, ["index", str(tmp_path / "photos"), "--db", str(db),
                              "--model", str(tmp_path / "no-such-model")])
    assert res.exit_code == 1 and "error:" in res.stderr, res.output
    assert not db.exists()


def test_ctrl_c_while_the_cli_still_imports_exits_130_without_a_traceback() -> None:
    code = ("import builtins\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'clipsearch.cli':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "from clipsearch.__main__ import main\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 130
    assert res.stderr.strip() == "interrupted"


def test_console_script_points_at_the_light_entry_module() -> None:
    import tomllib

    scripts = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clipsearch"] == "clipsearch.__main__:main"


@pytest.mark.parametrize("mode", [[], ["--json"], ["--paths"]])
def test_a_reader_that_stops_early_ends_search_by_sigpipe_not_an_error(
        indexed_db: Path, mode: list[str]) -> None:
    """`clipsearch search cat --json | head -1` exited 1 (the shell's pipefail reported a
    failure); a closed pipe ends the process the way it ends other Unix tools."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "search", "thing", "--db",
                             str(indexed_db), "-k", "5", *mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first result is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == -signal.SIGPIPE, err
    assert "Traceback" not in err and "error" not in err.lower()


@pytest.mark.parametrize("mode", [[], ["--json"], ["--paths"]])
def test_no_results_is_said_on_stderr_in_every_output_mode(indexed_db: Path, mode: list[str]
                                                           ) -> None:
    res = runner.invoke(app, ["search", "x", "--db", str(indexed_db), "--until", "1971",
                              *mode])
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and "no results" in res.stderr


@pytest.mark.parametrize("name", ["cat.faiss", "cat.vectors", "cat.sqlite3-wal", "x.lock"])
def test_a_catalogue_named_like_a_file_kept_beside_it_is_refused(tmp_path: Path, name: str,
                                                                 tiny_model: str) -> None:
    """--db NAME.faiss made the index path the catalogue itself: the index overwrote it."""
    (tmp_path / "p").mkdir()
    res = runner.invoke(app, ["index", str(tmp_path / "p"), "--db", str(tmp_path / name),
                              "--model", tiny_model])
    assert res.exit_code == 1 and "may not end in" in res.stderr, res.output
    assert not (tmp_path / name).exists()


def test_catalogues_with_one_stem_keep_separate_index_files(tmp_path: Path) -> None:
    from clipsearch.config import resolve_settings

    a, b = resolve_settings(db=tmp_path / "p.db"), resolve_settings(db=tmp_path / "p.sqlite3")
    assert a.index_path != b.index_path
    assert a.index_path.name == "p.db.faiss"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("mode", [[], ["--json"], ["--paths"]])
def test_results_that_cannot_be_written_are_one_error_line(indexed_db: Path, mode: list[str]
                                                          ) -> None:
    """`search ... > /dev/full` (a full disk) ended in a traceback."""
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "clipsearch", "search", "thing", "--db",
                              str(indexed_db), *mode], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr
    assert res.stderr.strip().endswith("error: cannot write the output: No space left on device")


@pytest.mark.parametrize("command", [["search", "cat"], ["similar", "x.png"],
                                     ["classify", "--labels", "a,b"], ["index", "."]])
def test_settings_errors_are_said_once_by_every_command(command: list[str], tmp_path: Path) -> None:
    """A bad --device or --db: one error (query commands also said 'unexpected Exit')."""
    res = runner.invoke(app, [*command, "--device", "gpu", "--db", str(tmp_path / "c.sqlite3")])
    assert res.exit_code == 1
    assert "--device gpu: not a device" in res.output and "cuda:N" in res.output
    assert res.output.count("error:") == 1, res.output
    res = runner.invoke(app, [*command, "--db", str(tmp_path / "c.faiss")])
    assert res.exit_code == 1 and res.output.count("error:") == 1, res.output


def test_queries_refuse_a_cuda_device_faiss_cannot_use(indexed_db: Path) -> None:
    from clipsearch.vector_index import gpu_count

    if gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    for command in (["search", "cat"], ["classify", "--labels", "a,b"]):
        res = runner.invoke(app, [*command, "--device", "cuda", "--db", str(indexed_db)])
        assert res.exit_code == 1 and "--device cuda: no CUDA GPU" in res.output, res.output


def test_db_with_a_trailing_slash_is_a_folder(tmp_path: Path) -> None:
    from clipsearch.config import CATALOGUE_FILENAME, resolve_settings

    settings = resolve_settings(db=str(tmp_path / "new") + "/")  # type: ignore[arg-type]
    assert settings.db_path == tmp_path / "new" / CATALOGUE_FILENAME


def test_an_index_that_fails_before_starting_prints_no_empty_progress_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["index", str(tmp_path / "nope"), "--db", str(tmp_path / "c.sqlite3")])
    assert res.exit_code == 1 and res.output.startswith("error: nothing to index"), res.output


def test_a_missing_folder_among_others_is_indexed_around_then_an_error(tmp_path: Path, make_image, tiny_model: str) -> None:  # type: ignore[no-untyped-def]
    """A script must notice a mistyped or unplugged root even when the others worked."""
    make_image("a.png", seed=1)
    db = tmp_path / "c.sqlite3"
    res = runner.invoke(app, ["index", str(tmp_path / "photos"), str(tmp_path / "nope"),
                              "--db", str(db), "--model", tiny_model, "-q", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout.splitlines()[0])["new"] == 1  # the result is not lost
    assert "not found: " + str(tmp_path / "nope") in res.output
