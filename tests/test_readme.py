"""The README's commands work as written: every `her` line parses with the real CLI, every `make` target exists,
every RM_ setting it names is one the server reads, and the scripts it points at start.

Commands that do real work are run elsewhere: the accelerate launch line in test_train.py, `her judge` in
test_genrm.py, `her serve` in the suite's rm_server fixture, `make bench` below at a tiny size."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from her_cli.main import build_parser
from rm_server import ServerSettings
from rm_server._ray import RaySettings
from rm_server._settings import _ENV_ALIASES

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "eval" / "README.md"]
DEPLOY_FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml",
                *sorted((ROOT / "docker").glob("Dockerfile*"))]


def shell_lines(markdown: str) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined, comments and [optional parts] dropped."""
    lines, joined = [], ""
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for raw in block.splitlines():
            line = re.sub(r"\s+#.*$", "", raw).rstrip()
            joined += line.removesuffix("\\").strip() + " "
            if not line.endswith("\\"):
                if joined.strip():
                    lines.append(re.sub(r"\[[^\]]*\]", "", joined).strip())
                joined = ""
    return lines


def her_commands() -> list[list[str]]:
    commands = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            match = re.match(r"(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?her\s+(.*)", line)
            if match:
                commands.append(shlex.split(match.group(1).replace("$", "X")))
    return commands


def test_readme_shows_her_commands():
    assert len(her_commands()) >= 15


@pytest.mark.parametrize("argv", her_commands(), ids=lambda a: " ".join(a[:3]))
def test_each_her_line_parses_with_the_real_cli(argv):
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`her {' '.join(argv)}` does not parse (exit {exc.code})")
    assert callable(args._run)


def make_targets() -> set[str]:
    targets = set()
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            match = re.match(r"(?:\S+=\S+\s+)*make\s+([a-z][\w-]*)", line)
            if match:
                targets.add(match.group(1))
    return targets


def test_each_make_target_in_the_readme_exists():
    targets = make_targets()
    assert {"test", "serve", "bench"} <= targets
    for target in targets:
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"
        for script in re.findall(r"\S+\.py", dry.stdout):
            assert (ROOT / script).is_file(), f"make {target} runs {script}, which does not exist"


def test_every_rm_setting_named_in_docs_and_deploy_files_is_read_by_the_server():
    known = {f"RM_{name.upper()}" for name in ServerSettings.model_fields}
    known |= {f"RM_{alias.upper()}" for alias in _ENV_ALIASES} | {"RM_CONFIG"}
    known |= {f"RM_RAY_{name.upper()}" for name in RaySettings.model_fields}
    named = set()
    for path in DOCS + DEPLOY_FILES:
        text = re.sub(r"RM_[A-Z_]*\*", "", path.read_text())  # families such as RM_RAY_* name no setting
        named |= set(re.findall(r"(?<![A-Z_])RM_[A-Z][A-Z_]*[A-Z]", text))
    assert {"RM_API_KEY", "RM_MODEL"} <= named
    assert not named - known, f"documented but unknown to the server: {sorted(named - known)}"


def test_one_key_name_for_server_and_clients(monkeypatch):
    from her_genrm import api_key_from_env

    monkeypatch.setenv("RM_API_KEY", "k1,k2")
    assert [k.get_secret_value() for k in ServerSettings.load().api_keys] == ["k1", "k2"]
    assert api_key_from_env() == "k1"
    monkeypatch.setenv("RM_API_KEYS", "k1,k2")
    assert len(ServerSettings.load().api_keys) == 2  # both names, same value: fine
    monkeypatch.setenv("RM_API_KEYS", "other")
    with pytest.raises(ValueError, match="RM_API_KEY and RM_API_KEYS are both set and differ"):
        ServerSettings.load()
    monkeypatch.delenv("RM_API_KEY")
    assert api_key_from_env() == "other"  # a client beside a server configured with the plural name


def test_bench_scripts_named_in_the_readme_exist():
    scripts = set(re.findall(r"bench/\w+\.py", (ROOT / "README.md").read_text()))
    assert "bench/bench_vllm.py" in scripts
    assert all((ROOT / s).is_file() for s in scripts)


@pytest.mark.model
@pytest.mark.own_engine
def test_make_bench_runs_at_a_tiny_size(tmp_path):
    """`make bench` end to end (vLLM over HTTP, transformers side by side), sized to a minute or two."""
    args = ("--clients 2 --pairs 2 --seq-pairs 1 --swap-pairs 1 --fast 1 --engine-pairs 1 --engine-mode fast "
            "--decode-tokens 8 --kv-cache-gib 0.5 "
            f"--out {tmp_path}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(["make", "bench", f"BENCH_ARGS={args}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "vllm.json").read_text())
    figures = results["figures"]
    assert figures["pairs_per_s_concurrent"] > 0 and figures["engine_speedup"] > 0 and figures["decode_tok_s"] > 0
    assert (tmp_path / "vllm_latency.png").stat().st_size > 0


def test_rm_model_semantics_as_documented(tmp_path):
    """README: the bundled id, an HF folder or a .gguf path everywhere; other names go to vLLM as hub ids; the
    transformers engine refuses them at once."""
    from her_engines import EngineUnavailable, resolve_model
    from her_engines._vllm import _local_path

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _local_path(hub_id) == hub_id
    with pytest.raises(EngineUnavailable, match="hub ids are not supported"):
        resolve_model(hub_id)
    folder = tmp_path / "judge"
    folder.mkdir()
    with pytest.raises(EngineUnavailable, match="no config.json"):
        resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)).kind == "hf" and _local_path(str(folder)).endswith("judge")
    assert "transformers engine takes local models only" in (ROOT / "README.md").read_text()
