from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "fastdrag demo" in block[0] and "pytest" in block[1]
    assert block[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_ci_installs_every_requirement_at_a_pinned_version():
    """.ci/run installs with .ci/constraints.txt, and that file pins every package setup.py asks for."""
    import re

    run = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt" in run and run.index("-c .ci/constraints.txt") < run.index("pytest")
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    setup = (ROOT / "setup.py").read_text()
    asked = set()
    for block in re.findall(r"install_requires=\[(.*?)\]|\"test\": \[(.*?)\]", setup, re.S):
        for text in re.findall(r"\"([A-Za-z0-9_.\-]+)", "".join(block)):
            asked.add(re.sub(r"[-_.]+", "-", text).lower())
    asked.discard("torch")  # pinned on its own in .ci/run
    assert len(asked) >= 10, asked
    assert asked <= set(pins), f"not pinned in .ci/constraints.txt: {sorted(asked - set(pins))}"
