"""The compose stack holds together: no Docker engine runs here, so these checks read the files as compose would
(the GPU file merged over the base one) and check each reference against the repository and the other services."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GPU = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())


def _host_paths(service: dict) -> list[Path]:
    paths = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("./"):
            paths.append(ROOT / source)
    return paths


def test_stack_has_every_part_and_each_reference_resolves():
    services = BASE["services"]
    assert {"rm_server", "redis", "prometheus", "grafana", "trainer"} <= set(services)
    for name, service in {**services, **GPU["services"]}.items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for path in _host_paths(service):
            assert path.exists(), f"{name} mounts {path}, which is not in the repository"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert services["trainer"]["profiles"] == ["trainer"]  # opt-in: `up` alone does not train
    # vLLM's shared memory: Docker's 64 MiB default killed the engine at start in the image smoke run
    assert services["rm_server"]["shm_size"] == "1g" and GPU["services"]["rm_server"]["ipc"] == "host"


def test_prometheus_scrapes_rm_server_and_loads_the_rules():
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    port = BASE["services"]["rm_server"]["ports"][0].split(":")[-1]
    assert f"rm_server:{port}" in targets
    assert all((ROOT / "docker" / "prometheus" / rules).is_file() for rules in config["rule_files"])


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard():
    grafana = BASE["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provisioning = ROOT / mounts_key(mounts, "/etc/grafana/provisioning")
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == f"http://prometheus:{BASE['services']['prometheus']['ports'][0].split(':')[-1]}"
    provider = yaml.safe_load((provisioning / "dashboards" / "her.yml").read_text())["providers"][0]
    dashboards_in_container = provider["options"]["path"]
    dashboards = ROOT / mounts_key(mounts, dashboards_in_container)
    assert (dashboards / "her-genrm.json").is_file()
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(dashboards_in_container)


def mounts_key(mounts: dict[str, str], target: str) -> str:
    return next(source for source, inside in mounts.items() if inside == target)


def test_trainer_and_server_share_the_key_name_and_the_url():
    services = BASE["services"]
    assert "RM_API_KEY" in services["trainer"]["environment"]
    server_env = BASE["x-rm-environment"]
    assert "RM_API_KEY" in server_env and server_env["RM_EXIT_ON_ENGINE_FAILURE"] == "true"
    command = services["trainer"]["command"]
    assert command[command.index("--reward-url") + 1] == "http://rm_server:8000"
    config = ROOT / command[command.index("--config") + 1]
    assert config.is_file()


def test_gpu_variant_overrides_the_server_with_the_cuda_image():
    server = GPU["services"]["rm_server"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert {"RM_MODEL", "RM_TENSOR_PARALLEL_SIZE"} <= set(server["environment"])
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert set(GPU["services"]) == {"rm_server"}  # everything else comes from the base file unchanged
