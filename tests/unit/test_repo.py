"""The newcomer's path: README commands, CI script and package metadata agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("latentshift demo") and "pip install -e ." in cmds[0]
    assert "pip install -e '.[dev]'" in cmds[1] and cmds[1].endswith(".venv/bin/pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = readme_commands()[1].split("&&")[-1].strip()
    assert re.search(rf"^{re.escape(test_cmd)}$", ci, re.M)
    assert "pip install -q --progress-bar off -e '.[dev]'" in ci


def test_package_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "latentshift" and meta["scripts"]["latentshift"] == "pipeline.cli:main"
    deps = " ".join(meta["dependencies"])
    for dep in ("ray[default,data]>=2.60", "torch", "diffusers", "transformers", "pyarrow", "webdataset", "s3fs",
                "open_clip_torch", "safetensors", "pydantic", "pyyaml"):
        assert dep in deps, dep
    assert not re.search(r"==", deps), "pin lower bounds, not exact versions"


# the project's design notes live outside the repository; a citation of them reads as a file a user lacks
OUTSIDE_DESIGN_FILE = "DESIGN" + ".md"


def test_docs_the_code_cites_exist():
    """Citations of docs/maths.md name one of its sections; README's and docs' relative links resolve;
    nothing cites a file a user's clone does not have."""
    headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "maths.md").read_text(), re.M))
    cited = 0
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        text = path.read_text()
        assert OUTSIDE_DESIGN_FILE not in text, path
        for section in re.findall(r'docs/maths\.md, "([^"]+)"', text):
            assert section in headings, f"{path.relative_to(ROOT)} cites docs/maths.md \"{section}\""
            cited += 1
    assert cited
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}"
