"""README.md's two commands are the contract: CI runs exactly the test command, the main job is train_rm."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current).strip())
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_main_job_is_the_reward_model_default():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert blocks[0].endswith("python -m starling_jax.train_rm")


def test_base_install_declares_what_the_main_job_imports_beyond_transformers():
    """`pip install -e .` (no dev extra) must run train_rm: transformers' chat templates need jinja2, which only
    torch (dev) would otherwise bring in."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for d in deps}
    assert {"jinja2", "transformers", "tokenizers", "mistral-common", "tensorflow-cpu"} <= names


def test_readme_links_point_to_files_in_the_repository():
    import re

    text = (ROOT / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)]+)\)", text) if "://" not in link]
    assert links, "README links to its docs pages"
    missing = [link for link in links if link and not (ROOT / link).exists()]
    assert not missing, missing
