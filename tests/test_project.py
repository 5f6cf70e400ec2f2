"""Project-level checks: public surface, docker-compose shape, the README's two commands."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import vel

ROOT = Path(__file__).resolve().parent.parent
DOCS = tuple(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")))


def test_public_names_are_sorted_and_importable() -> None:
    assert vel.__all__ == sorted(vel.__all__)
    for name in vel.__all__:
        assert getattr(vel, name) is not None


def test_every_error_derives_from_vel_error() -> None:
    import vel.errors as errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), vel.VelError), name


def compose() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_redis_postgres_flusher_and_workers() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert {"redis", "postgres", "migrate", "flusher", "worker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] >= 2
    for name in ("redis", "postgres"):
        assert "test" in services[name]["healthcheck"], name


def test_compose_redis_cannot_lose_or_evict_unflushed_data() -> None:
    command = compose()["services"]["redis"]["command"]  # type: ignore[index]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"].startswith("volatile-")


def test_compose_workers_share_one_session_and_the_flusher_exports_metrics() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    worker = services["worker"]["command"]
    assert worker[0] == "demo" and worker[worker.index("--storage") + 1] == "redis"
    # Every replica runs the same command, so they all join one conversation.
    assert worker[worker.index("--session-id") + 1]
    flusher = services["flusher"]
    port = flusher["command"][flusher["command"].index("--metrics-port") + 1]
    # The published port reaches a container's process only if it listens on all interfaces
    # (the flag's default is 127.0.0.1).
    assert flusher["command"][flusher["command"].index("--metrics-host") + 1] == "0.0.0.0"
    assert any(str(p).endswith(f":{port}") for p in flusher["ports"])
    assert f":{port}/metrics" in " ".join(flusher["healthcheck"]["test"])
    assert flusher["environment"]["VEL_LOG_FORMAT"] == "json"


def test_compose_api_runs_the_fastapi_example_with_several_workers() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    api = services["api"]["entrypoint"]
    assert api[:2] == ["uvicorn", "examples.fastapi_chat:app"]
    assert (ROOT / "examples" / "fastapi_chat.py").exists()
    assert int(api[api.index("--workers") + 1]) >= 2
    assert services["api"]["environment"]["VEL_FLUSHER"] == "off"
    assert "fake-llm" in services


def test_compose_services_share_the_storage_settings() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    for name in ("migrate", "flusher", "worker", "api"):
        env = services[name]["environment"]
        assert env["POSTGRES_DSN"].startswith("postgresql://"), name
        assert env["REDIS_URL"].startswith("redis://"), name
    assert services["worker"]["environment"]["VEL_FLUSHER"] == "off"
    assert services["flusher"]["command"][0] == "flusher"
    assert services["postgres"]["volumes"]


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo" in readme and "scripts/test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec bash scripts/test$", ci, re.M)


def test_readme_quickstart_runs_the_multi_worker_example_and_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Multi-worker demo in three commands", 1)[1].split("\n## ", 1)[0]
    commands = section.split("```sh\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(commands) == 3
    for path in re.findall(r"((?:scripts|examples)/[\w.]+)", "\n".join(commands)):
        assert (ROOT / path).exists(), path
    assert "vel migrate" in commands[1] and "multi_worker.py" in commands[2]
    for doc in re.findall(r"\]\((docs/[\w.]+)", readme):
        assert (ROOT / doc).exists(), doc


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_place_names_the_same_distribution_and_version() -> None:
    project = pyproject()["project"]
    assert project["name"] == vel.DISTRIBUTION
    assert project["name"] != "vel"  # an unrelated project on PyPI owns `vel`
    # The one version: pyproject, read back through the installed metadata.
    assert vel.__version__ == project["version"] == metadata.version(vel.DISTRIBUTION)
    assert "version" not in project.get("dynamic", [])
    named: dict[str, list[str]] = {}
    for path in ("README.md", "Dockerfile", "scripts/setup.sh", "scripts/bench", *DOCS):
        for line in re.findall(r"pip install ([^\n`]*)", (ROOT / path).read_text()):
            for word in line.split():
                word = word.strip("'\"")
                if word.startswith(("-", "2>", ">", "|", "\\")) or not word:
                    continue
                named.setdefault(word.split("[")[0], []).append(path)
    # Checkouts install themselves ("." or -e .); anything else names the one distribution.
    assert set(named) <= {".", vel.DISTRIBUTION}, named
    assert "README.md" in named.get(vel.DISTRIBUTION, []), "the README gives the install line"


def test_classifiers_cover_the_supported_pythons_and_typing() -> None:
    project = pyproject()["project"]
    classifiers = set(project["classifiers"])
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    assert project["requires-python"] == ">=3.11"
    assert (ROOT / "vel" / "py.typed").exists()


def test_the_test_command_runs_the_lifecycle_tests_on_three_pythons() -> None:
    """The whole suite on Python 3.11; the contract, spec-snippet and lifecycle tests also on
    3.12 and 3.13 (asyncio's cancellation differs between them)."""
    script = (ROOT / "scripts" / "test").read_text()
    found = re.search(r"^OTHER_PYTHONS_TESTS=\(\n(.*?)\n\)", script, re.M | re.S)
    assert found is not None
    listed = found.group(1).split()
    for path in listed:
        assert (ROOT / path).is_file(), path
    assert {
        "tests/test_store_contract.py",
        "tests/test_spec_snippets.py",
        "tests/test_turn_lifecycle.py",
        "tests/test_lost_cancellation.py",
        "tests/test_fork.py",
    } <= set(listed)
    for venv in (".venv312", ".venv313"):
        assert venv in script
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--all-pythons" in setup and "--all-pythons" in script
