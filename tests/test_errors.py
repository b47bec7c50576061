"""ucofia_jax/errors.py: one module of user-facing errors, one class each, reported by both
command lines as one line with status 2."""

import io
import subprocess
import sys

import pytest

from data_pipeline import records, video
from ucofia_jax import errors
from ucofia_jax.models import clip_import, torch_reader
from ucofia_jax.runtime import cli
from ucofia_jax.search import __main__ as search_cli
from ucofia_jax.search import store
from ucofia_jax.training import checkpoints, loop

USER_ERRORS = [
    errors.ConfigError,
    errors.CheckpointError,
    errors.DataError,
    errors.NonFiniteLossError,
    errors.SourceError,
    errors.SearchIndexError,
    errors.IndexingError,
    errors.ModelMismatch,
]


def test_one_class_each():
    # The modules that raise them use the errors module's classes, not their own.
    assert checkpoints.CheckpointError is torch_reader.CheckpointError is errors.CheckpointError
    assert clip_import.CheckpointError is errors.CheckpointError
    assert records.DataError is errors.DataError
    assert issubclass(video.VideoDecodeError, errors.DataError)
    assert loop.NonFiniteLossError is errors.NonFiniteLossError
    assert not hasattr(store, "IndexError_")


@pytest.mark.parametrize("cls", USER_ERRORS, ids=lambda c: c.__name__)
def test_the_command_line_reports_each_in_one_line_with_status_2(cls):
    assert issubclass(cls, errors.UserError)
    out = io.StringIO()

    def fail():
        raise cls("config.data.dir: missing\n")

    assert cli.guarded(fail, stream=out) == cli.USER_ERROR
    assert out.getvalue().splitlines()[0] == "error: config.data.dir: missing"


def test_any_other_exception_is_a_bug_with_a_traceback():
    def fail():
        raise KeyError("x")

    with pytest.raises(KeyError):
        cli.guarded(fail, stream=io.StringIO())


def test_search_reports_a_user_error_in_one_line(tmp_path, capsys):
    code = search_cli.main(["query", "--index", str(tmp_path / "none"), "a dog"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err
        == f"error: {tmp_path / 'none'}: no such index (run `python -m ucofia_jax.search index`)\n"
    )


def test_errors_module_imports_nothing_of_ours():
    code = "import sys, ucofia_jax.errors; print(sorted(m for m in sys.modules if m.startswith(('ucofia_jax.', 'data_pipeline'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ucofia_jax.errors']"
