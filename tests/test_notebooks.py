"""The notebooks under notebooks/ run top to bottom in a fresh kernel, and none is committed with outputs.

Each notebook is executed with nbclient in small mode (``BEBOP_NOTEBOOK_SMALL=1``), with the notebooks
directory as its working directory and the repository root on the kernel's PYTHONPATH. The kernel
inherits this process's environment, so it also gets the 8 fake CPU devices and the unoptimised XLA
backend that tests/conftest.py sets (the notebooks use one device in small mode).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300

# What each notebook must show: output MIME types it must produce, and text that must appear in its
# outputs. A notebook without an entry only has to run without error.
EXPECTED = {
    "01_mtp_heads.ipynb": {
        "mime": ("image/png", "text/markdown"),
        "text": ("| ce |", "| e2e_tv |", "TF E[A] rejection", "notebook finished"),
    },
    "02_speculative_decoding.ipynb": {
        "mime": ("image/png", "text/markdown"),
        "text": ("chi-squared p-values vs vanilla", "| rejection |", "ratio vs none", "notebook finished"),
    },
    "03_rl.ipynb": {
        "mime": ("image/png", "text/markdown"),
        "text": ("| step | reward (rejection) | reward (none) |", "mean accepted / K", "notebook finished"),
    },
}


def _outputs_text_and_mime(nb) -> tuple[str, set[str]]:
    texts, mimes = [], set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                mimes.update(out.data)
                texts.extend(v for k, v in out.data.items() if k.startswith("text/") and isinstance(v, str))
    return "\n".join(texts), mimes


def test_the_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert set(EXPECTED) <= names, f"missing notebooks: {sorted(set(EXPECTED) - names)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_small_mode(path: Path, monkeypatch):
    monkeypatch.setenv("BEBOP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell's traceback) on the first failing cell
    seconds = time.perf_counter() - start
    print(f"{path.name}: executed in {seconds:.0f} s")

    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{path.name}: a code cell did not run"
    text, mimes = _outputs_text_and_mime(nb)
    expected = EXPECTED.get(path.name, {})
    missing_mime = [m for m in expected.get("mime", ()) if m not in mimes]
    assert not missing_mime, f"{path.name}: no {missing_mime} output (got {sorted(mimes)})"
    missing_text = [t for t in expected.get("text", ()) if t not in text]
    assert not missing_text, f"{path.name}: outputs lack {missing_text}"


def _repo_notebooks() -> list[Path]:
    """Every .ipynb of the repository: tracked or untracked, not git-ignored (all files outside
    hidden directories without git)."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.ipynb"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        return sorted(REPO / p for p in out.split("\0") if p and (REPO / p).is_file())
    return sorted(p for p in REPO.rglob("*.ipynb")
                  if not any(part.startswith(".") for part in p.relative_to(REPO).parts))


def test_no_notebook_is_committed_with_outputs():
    notebooks = _repo_notebooks()
    assert notebooks, "no notebook found in the repository"
    dirty = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if cell.get("outputs"):
                dirty.append(f"{path.relative_to(REPO)} cell {i}: has outputs")
            if cell.get("execution_count") is not None:
                dirty.append(f"{path.relative_to(REPO)} cell {i}: execution_count {cell.execution_count}")
    assert not dirty, ("notebooks must be committed with outputs stripped (Jupyter's 'Clear All Outputs', "
                       "or `jupyter nbconvert --clear-output --inplace notebooks/*.ipynb`):\n" + "\n".join(dirty))
