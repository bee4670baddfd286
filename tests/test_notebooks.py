"""Execute every notebook of the course (notebooks/*.ipynb) top to bottom, one at a time.

Each notebook is its own test, so a failure names it. The kernel runs with MINIGPT2_FAST=1,
which makes runs smaller (each notebook's first cell says how: fewer steps or probes, shorter
sequences, a smaller tokenizer corpus in 01) and skips building the 6 GB gpt2-xl model in
notebook 09 and the claims of notebook 11 that need its full budget; the other assertions a
notebook teaches (gradient checks and their negative controls, num_params, parity with
transformers, the loss falling, the graders on the worked solutions) still run. An error
in any cell, a failed assert included, fails the test. The notebooks run from their own folder,
so relative paths inside them mean what they mean for a reader. MINIGPT2_CACHE points at a
temporary folder shared by the run, so notebook 06's saved model reaches notebook 07 without
touching the user's ~/.cache/minigpt2.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("minigpt2_cache")


def test_the_course_has_notebooks():
    assert len(NOTEBOOKS) >= 1, "notebooks/ holds no numbered notebook"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, cache):
    # The kernel is a child process: it inherits this environment.
    monkeypatch.setenv("MINIGPT2_FAST", "1")
    monkeypatch.setenv("MINIGPT2_CACHE", str(cache))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
