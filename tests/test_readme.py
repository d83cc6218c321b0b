from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "fastdrag demo" in block[0] and "pytest" in block[1]
    assert block[1] in (ROOT / ".ci" / "run").read_text().splitlines()
