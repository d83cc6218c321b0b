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


def test_setup_admits_exactly_the_oldest_versions_ci_checks():
    """setup.py's floors for diffusers, transformers and peft are the versions .ci/oldest.txt pins, and .ci/run
    runs .ci/run_oldest (which installs that file) after the suite: a floor cannot be lowered unchecked."""
    import re

    from packaging.version import Version

    oldest = dict(line.split("==") for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    floors = dict(re.findall(r'"([a-z]+)>=([0-9.]+)"', (ROOT / "setup.py").read_text()))
    assert set(oldest) == {"diffusers", "transformers", "peft"}
    assert all(Version(floors[name]) == Version(version) for name, version in oldest.items()), (floors, oldest)
    run = (ROOT / ".ci" / "run").read_text()
    assert run.index("bash .ci/run_oldest") > run.index("pytest")
    assert "-r .ci/oldest.txt" in (ROOT / ".ci" / "run_oldest").read_text()
