"""Service settings: environment (`RM_` prefix), an optional YAML file, then defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from her_engines import EngineSettings
from her_genrm import HerRMStage, Mode, PrincipleDetail


class ServerSettings(BaseSettings, EngineSettings):
    """Everything an operator can set. Env vars win over the YAML file (`RM_CONFIG` or `--config`).

    The engine fields (`engine`, `model`, `dtype`, `kv_cache_gib`, ...) come from `EngineSettings`.
    """

    model_config = SettingsConfigDict(env_prefix="RM_", extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 8000
    """TCP port to listen on."""
    principles_path: str | None = None
    """Principle library YAML; default: the bundled library."""
    openrlhf_mode: Mode = "cot"
    """Judge mode for /get_reward (OpenRLHF's protocol carries no mode)."""
    principle_detail: PrincipleDetail | None = None
    """How the compact template lists principles: ids only (cheapest), short names, full definitions, or
    none (judges trained by `her train genrm`). Unset: what the model folder's judge card says, else ids."""
    her_rm_template: str | None = None
    """Template file of the released HER-RM judge; enables template=her-rm."""
    her_rm_stage: HerRMStage = "sft"
    """Which HER-RM checkpoint is served: sft (after reward SFT) or rl (after reward RL: HER's RL-stage request
    is appended to the prompt, and the judge reasons in <think> before its answer)."""
    api_keys: list[SecretStr] = Field(default_factory=list)
    """Bearer keys, comma-separated: RM_API_KEY (the name the clients read too) or RM_API_KEYS. Empty: auth
    off."""
    metrics_require_auth: bool = False
    """Whether /metrics needs a key too (Prometheus scrapers often have none)."""
    docs_require_auth: bool = True
    """Whether /docs and /openapi.json need a key when keys are set (the liveness and readiness probes never do)."""
    redis_url: str | None = None
    """Redis URL for the verdict cache; unset: in-process LRU cache."""
    cache_ttl_s: int = 7 * 24 * 3600
    """How long a cached verdict lives."""
    cache_max_entries: int = 100_000
    """Size of the in-process cache when no Redis is configured."""
    batching: Literal["auto", "continuous", "micro"] = "auto"
    """How pairs reach the engine: continuous (each on arrival, up to max_inflight at once), micro (batches of
    max_batch_size after max_wait_ms, one at a time), auto (continuous for engines that batch by themselves:
    vllm, openai; micro for transformers)."""
    max_batch_size: int = 16
    """Pairs per engine call of an engine that needs batches (transformers); both orders go together."""
    max_wait_ms: float = 15.0
    """How long the micro-batcher waits to fill a batch after its first pair (transformers only)."""
    max_inflight: int = 64
    """Pairs inside an engine that batches continuously (vllm, openai) at once; more wait in the queue."""
    max_queue: int = 512
    """Pairs waiting for the engine before new requests get 429."""
    rate_limit_pairs_per_s: float = Field(0.0, ge=0)
    """Pairs per second each client (API key, or address when auth is off) may send; over it: 429 +
    Retry-After. 0: no per-client limit."""
    rate_limit_burst: int | None = Field(None, ge=1)
    """Pairs a client may send at once before its rate applies; unset: twice the rate (at least 1)."""
    fair_share: bool = True
    """Once the queue is over half full, a client holding more than an equal share of it gets 429, so one
    client cannot starve the others."""
    request_timeout_s: float = 300.0
    """Deadline of one pair from arrival to verdict; past it: 504."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest accepted request body; larger: 413."""
    max_candidate_chars: int = 8_000
    """Longest candidate reply; longer: 422."""
    max_context_chars: int = 32_000
    """Longest rendered context; longer: 422."""
    max_items_per_request: int = 1024
    """Most pairs or completions in one batch/rewards request; more: 422."""
    telemetry_window: int = 1000
    """Judgments in the rolling window of the judge-health gauges."""
    hack_probe_every: int = Field(50, ge=0)
    """Every Nth fresh ok judgment, also judge its context against a degenerate or judge-aimed canary reply
    (fast mode, ~2% more engine work at 50) to feed rm_hack_probe_flip_ratio and rm_hack_probes_total. 0: off."""
    exit_on_engine_failure: bool = False
    """Exit with status 1 when the model fails to load or the engine dies, for orchestrators that restart
    what exits. Off: the process stays up and /healthz and /readyz answer 503 with the error."""
    log_level: str = "info"
    """uvicorn log level."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _CommaSafeEnv(settings_cls), _YamlSource(settings_cls)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
        """Settings from (highest first) explicit overrides, RM_* env vars, the YAML file."""
        _YamlSource.path = Path(config_file) if config_file else None
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _YamlSource.path = None


class _CommaSafeEnv(PydanticBaseSettingsSource):
    """RM_* variables; list fields take comma-separated text instead of JSON."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        import os

        self._env = {k[3:].lower(): v for k, v in os.environ.items() if k.upper().startswith("RM_")}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._env.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        names = set(self.settings_cls.model_fields)
        self._fold_aliases()
        # RM_CONFIG names the YAML file; RM_RAY_* belong to the Ray Serve launcher (rm_server._ray).
        unknown = sorted(k for k in self._env if k not in names and k != "config" and not k.startswith("ray_"))
        if unknown:
            raise ValueError(f"unknown RM_ setting(s): {', '.join('RM_' + k.upper() for k in unknown)}")
        return {k: v for k, v in self._env.items() if k in names}

    def _fold_aliases(self) -> None:
        for alias, name in _ENV_ALIASES.items():
            if alias not in self._env:
                continue
            value = self._env.pop(alias)
            if name in self._env and self._env[name] != value:
                raise ValueError(f"RM_{alias.upper()} and RM_{name.upper()} are both set and differ; "
                                 f"they are the same setting: keep one")
            self._env[name] = value


# Env names also accepted for a setting: RM_API_KEY is what the clients read (one key or several).
_ENV_ALIASES = {"api_key": "api_keys"}


class _YamlSource(PydanticBaseSettingsSource):
    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        import os

        path = self.path or (Path(os.environ["RM_CONFIG"]) if os.environ.get("RM_CONFIG") else None)
        if path is None:
            return {}
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of setting names to values")
        return data
