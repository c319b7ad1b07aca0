"""Worker configuration: sources and their precedence, conversion, validation, redaction."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inspector.config import (
    REDACTED,
    ConfigError,
    WorkerConfig,
    default_config_path,
    load_config,
    mask_url_secrets,
    redacted,
    validate,
)

SECRET = "s3cr3t-Passw0rd"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "line3.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(env: dict[str, str] | None = None, overrides: dict | None = None, path: Path | None = None,
         line: str | None = "3") -> WorkerConfig:
    return load_config(path, env or {}, overrides or {}, line)


# --------------------------------------------------------------------------- defaults


def test_defaults_are_valid() -> None:
    cfg = WorkerConfig(line="3")
    assert validate(cfg) is cfg
    assert load() == cfg
    assert cfg.batch.max_batch == 4 and cfg.engine.batch_sizes == (1, 2, 4)
    assert cfg.ingest.overload == "drop_oldest" and cfg.publish.heatmaps == "fail"
    assert cfg.banks.store.startswith("file:///") and cfg.http.bind == "127.0.0.1"


def test_config_is_frozen() -> None:
    cfg = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch.max_batch = 8  # type: ignore[misc]


def test_default_config_path_names_the_line() -> None:
    assert default_config_path("3") == Path("/etc/inspector/line3.toml")


# --------------------------------------------------------------------------- precedence

FILE = """
line = 1

[batch]
max_batch = 2
max_delay_ms = 5
deadline_ms = 500.0

[engine]
artifact = "/opt/models/a"
batch_sizes = [1, 2]
"""


def test_file_env_flags_precedence_field_by_field(tmp_path: Path) -> None:
    path = write_toml(tmp_path, FILE)
    env = {"INSPECTOR_BATCH_MAX_DELAY_MS": "7.5", "INSPECTOR_BATCH_DEADLINE_MS": "600", "INSPECTOR_LINE": "2"}
    flags = {"batch.deadline_ms": 700.0}
    cfg = load_config(path, env, flags, None)
    assert cfg.batch.max_batch == 2  # file only
    assert cfg.batch.max_delay_ms == 7.5  # file < env
    assert cfg.batch.deadline_ms == 700.0  # file < env < flag
    assert cfg.engine.artifact == "/opt/models/a" and cfg.engine.batch_sizes == (1, 2)
    assert cfg.ingest == WorkerConfig().ingest  # untouched stage keeps its defaults
    assert cfg.line == "2"  # env over the file's line = 1 (an integer in TOML)


def test_line_argument_wins_over_every_other_source(tmp_path: Path) -> None:
    path = write_toml(tmp_path, FILE)
    cfg = load_config(path, {"INSPECTOR_LINE": "2"}, {"line": "4"}, "5")
    assert cfg.line == "5"
    assert load_config(path, {"INSPECTOR_LINE": "2"}, {"line": "4"}, None).line == "4"
    assert load_config(path, {}, {}, None).line == "1"


def test_flags_given_as_text_are_converted_and_none_means_not_given() -> None:
    cfg = load(overrides={"batch.max_batch": "8", "engine.batch_sizes": "1,2,8", "batch.max_delay_ms": None,
                          "log.json": "false", "engine.threshold": 1.5})
    assert cfg.batch.max_batch == 8 and cfg.engine.batch_sizes == (1, 2, 8)
    assert cfg.batch.max_delay_ms == WorkerConfig().batch.max_delay_ms
    assert cfg.log.json is False and cfg.engine.threshold == 1.5


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True),
    ("false", False), ("0", False), ("no", False), ("No", False),
])
def test_env_booleans(text: str, expected: bool) -> None:
    assert load({"INSPECTOR_LOG_JSON": text}).log.json is expected


def test_env_conversion_to_each_field_type() -> None:
    cfg = load({
        "INSPECTOR_INGEST_QUEUE_SIZE": "64",
        "INSPECTOR_BATCH_MAX_DELAY_MS": "2.5",
        "INSPECTOR_ENGINE_BATCH_SIZES": " 1, 2 ,8",
        "INSPECTOR_ENGINE_THRESHOLD": "1.25",
        "INSPECTOR_ENGINE_THREADS": "",
        "INSPECTOR_ENGINE_CALIBRATION": "bank",
        "INSPECTOR_BANKS_USERNAME": "",
        "INSPECTOR_PUBLISH_HEATMAPS": "all",
        "INSPECTOR_HTTP_PORT": "0",
    })
    assert cfg.ingest.queue_size == 64 and isinstance(cfg.ingest.queue_size, int)
    assert cfg.batch.max_delay_ms == 2.5
    assert cfg.engine.batch_sizes == (1, 2, 8)
    assert cfg.engine.threshold == 1.25 and cfg.engine.calibration == "bank"
    assert cfg.engine.threads is None and cfg.banks.username is None  # "" means unset
    assert cfg.publish.heatmaps == "all" and cfg.http.port == 0


def test_optional_field_can_be_cleared_by_env_after_the_file_set_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[engine]\nthreshold = 2.0\n")
    assert load(path=path).engine.threshold == 2.0
    assert load({"INSPECTOR_ENGINE_THRESHOLD": ""}, path=path).engine.threshold is None


def test_other_inspector_variables_are_not_config() -> None:
    env = {"INSPECTOR_BACKBONE_WEIGHTS": "/w.safetensors", "INSPECTOR_TEST_REDIS_URL": "redis://h", "PATH": "/bin"}
    assert load(env) == WorkerConfig(line="3")


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=2**31))
def test_env_integer_round_trips(value: int) -> None:
    assert load({"INSPECTOR_INGEST_QUEUE_SIZE": str(value)}).ingest.queue_size == value


# --------------------------------------------------------------------------- errors

FILE_ERRORS = [
    ("[batches]\nmax_batch = 2\n", "batches"),
    ("[batch]\nmax_batches = 2\n", "max_batches"),
    ("batch = 3\n", "[batch]"),
    ("[batch]\nmax_batch = \"4\"\n", "batch.max_batch"),
    ("[batch]\nmax_batch = true\n", "batch.max_batch"),
    ("[ingest]\noverload = \"drop_all\"\n", "ingest.overload"),
    ("[ingest]\nqueue_size = 0\n", "ingest.queue_size"),
    ("[ingest]\nmax_payload_bytes = -1\n", "ingest.max_payload_bytes"),
    ("[ingest]\nbind = \"127.0.0.1:5555\"\n", "ingest.bind"),
    ("[engine]\nbatch_sizes = [4, 2]\n", "engine.batch_sizes"),
    ("[engine]\nbatch_sizes = [1, 1, 2]\n", "engine.batch_sizes"),
    ("[engine]\nbatch_sizes = [0, 1]\n", "engine.batch_sizes"),
    ("[engine]\nbatch_sizes = []\n", "engine.batch_sizes"),
    ("[engine]\nbatch_sizes = [1, 2.5]\n", "engine.batch_sizes"),
    ("[engine]\nmin_route_similarity = 1.5\n", "engine.min_route_similarity"),
    ("[engine]\ncalibration = \"max\"\n", "engine.calibration"),
    ("[engine]\nprecision = \"fp16\"\ndevice = \"cpu\"\n", "engine.precision"),
    ("[publish]\nheatmap_scale = 0.0\n", "publish.heatmap_scale"),
    ("[banks]\nstore = \"redis:///0\"\n", "banks.store"),
    ("[banks]\nprefix = \"a b\"\n", "banks.prefix"),
    ("[banks]\ntls_ca_file = \"/ca.pem\"\n", "banks.tls_ca_file"),
    ("[ingest]\ncurve_allowed_clients_dir = \"/keys\"\n", "ingest.curve_allowed_clients_dir"),
    ("[http]\nport = 70000\n", "http.port"),
    ("[log]\nlevel = \"loud\"\n", "log.level"),
    ("[log]\njson = \"yes\"\n", "log.json"),
    ("line = \"3.1\"\n", "line"),
]


@pytest.mark.parametrize(("text", "field"), FILE_ERRORS)
def test_file_errors_name_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, {}, {}, None if text.startswith("line") else "3")
    assert f"config file {path}" in str(err.value)
    assert field in str(err.value)


ENV_ERRORS = [
    ({"INSPECTOR_BATCH_MAX_BATCHES": "3"}, "INSPECTOR_BATCH_MAX_BATCHES", "MAX_BATCH"),
    ({"INSPECTOR_HTTP_PORT": "abc"}, "INSPECTOR_HTTP_PORT", "http.port"),
    ({"INSPECTOR_HTTP_PORT": "70000"}, "INSPECTOR_HTTP_PORT", "http.port"),
    ({"INSPECTOR_LOG_JSON": "maybe"}, "INSPECTOR_LOG_JSON", "log.json"),
    ({"INSPECTOR_PUBLISH_HEATMAPS": "some"}, "INSPECTOR_PUBLISH_HEATMAPS", "publish.heatmaps"),
    ({"INSPECTOR_BATCH_MAX_DELAY_MS": "nan"}, "INSPECTOR_BATCH_MAX_DELAY_MS", "batch.max_delay_ms"),
    ({"INSPECTOR_BATCH_MAX_DELAY_MS": "-1"}, "INSPECTOR_BATCH_MAX_DELAY_MS", "batch.max_delay_ms"),
    ({"INSPECTOR_ENGINE_BATCH_SIZES": "1,two"}, "INSPECTOR_ENGINE_BATCH_SIZES", "engine.batch_sizes"),
    ({"INSPECTOR_ENGINE_BATCH_SIZES": ""}, "INSPECTOR_ENGINE_BATCH_SIZES", "engine.batch_sizes"),
    ({"INSPECTOR_ENGINE_THREADS": "0"}, "INSPECTOR_ENGINE_THREADS", "engine.threads"),
    ({"INSPECTOR_BANKS_KEEP_VERSIONS": "0"}, "INSPECTOR_BANKS_KEEP_VERSIONS", "banks.keep_versions"),
    ({"INSPECTOR_ENGINE_PRECISION": "fp16", "INSPECTOR_ENGINE_DEVICE": "cpu"},
     "INSPECTOR_ENGINE_PRECISION", "engine.precision"),
]


@pytest.mark.parametrize(("env", "source", "field"), ENV_ERRORS)
def test_env_errors_name_the_variable_and_the_field(env: dict[str, str], source: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(env)
    assert f"environment {source}" in str(err.value)
    assert field in str(err.value)


FLAG_ERRORS = [
    ({"batchs.max_batch": 2}, "batchs.max_batch", "batchs"),
    ({"batch.size": 2}, "batch.size", "size"),
    ({"batch.max_batch": "many"}, "batch.max_batch", "batch.max_batch"),
    ({"batch.max_batch": 0}, "batch.max_batch", "batch.max_batch"),
    ({"batch.max_batch": 2.0}, "batch.max_batch", "batch.max_batch"),
    ({"log.json": 1}, "log.json", "log.json"),
    ({"ingest.overload": "drop"}, "ingest.overload", "ingest.overload"),
    ({"line": "a b"}, "line", "line"),
]


@pytest.mark.parametrize(("flags", "source", "field"), FLAG_ERRORS)
def test_flag_errors_name_the_flag_and_the_field(flags: dict, source: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(overrides=flags, line=None if "line" in flags else "3")
    assert f"command-line flag {source}" in str(err.value)
    assert field in str(err.value)


def test_unknown_key_suggests_the_closest_field(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[batch]\nmax_batchs = 8\n")
    with pytest.raises(ConfigError, match="did you mean 'max_batch'"):
        load(path=path)


def test_missing_line_is_an_error() -> None:
    with pytest.raises(ConfigError, match="line"):
        load(line=None)


def test_missing_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"config file {missing}: not found"):
        load(path=missing)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[batch\nmax_batch = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path=path)


def test_validate_checks_configs_built_in_code() -> None:
    bad = dataclasses.replace(WorkerConfig(line="3"), batch=dataclasses.replace(WorkerConfig().batch, max_batch=-2))
    with pytest.raises(ConfigError, match=r"default: batch\.max_batch: must be > 0"):
        validate(bad)


# --------------------------------------------------------------------------- secrets


def test_credentials_directory_sets_the_password(tmp_path: Path) -> None:
    (tmp_path / "redis_password").write_text(SECRET + "\n", encoding="utf-8")
    assert load({"CREDENTIALS_DIRECTORY": str(tmp_path)}).banks.password == SECRET


def test_credentials_directory_without_the_file_sets_nothing(tmp_path: Path) -> None:
    assert load({"CREDENTIALS_DIRECTORY": str(tmp_path)}).banks.password is None


def test_password_precedence_file_credentials_env_flags(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis_password").write_text("from-credentials", encoding="utf-8")
    path = write_toml(tmp_path, '[banks]\npassword = "from-file"\n')
    base = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert load(path=path).banks.password == "from-file"
    assert load(base, path=path).banks.password == "from-credentials"
    alias = {**base, "INSPECTOR_REDIS_PASSWORD": "from-alias"}
    assert load(alias, path=path).banks.password == "from-alias"
    canonical = {**alias, "INSPECTOR_BANKS_PASSWORD": "from-env"}
    assert load(canonical, path=path).banks.password == "from-env"
    assert load(canonical, {"banks.password": "from-flag"}, path=path).banks.password == "from-flag"


def test_redacted_never_contains_the_password() -> None:
    cfg = load({"INSPECTOR_BANKS_PASSWORD": SECRET, "INSPECTOR_INGEST_CURVE_SERVER_SECRET_KEY": "/keys/server.key"})
    dump = json.dumps(redacted(cfg))
    assert SECRET not in dump
    view = redacted(cfg)
    assert view["banks"]["password"] == REDACTED
    assert view["ingest"]["curve_server_secret_key"] == REDACTED
    assert view["batch"]["max_batch"] == cfg.batch.max_batch  # everything else is as resolved
    assert cfg.banks.password == SECRET  # redaction is a view, the config keeps the secret


def test_redacted_leaves_unset_secrets_unset() -> None:
    assert redacted(load())["banks"]["password"] is None


@pytest.mark.parametrize("store", [
    f"redis://inspector:{SECRET}@redis.local:6379/0",
    f"rediss://:{SECRET}@redis.local:6380/1",
    f"redis://redis.local:6379/0?password={SECRET}",
])
def test_redacted_masks_a_password_inside_the_store_url(store: str) -> None:
    view = redacted(load({"INSPECTOR_BANKS_STORE": store}))
    assert SECRET not in json.dumps(view)
    assert "redis.local" in view["banks"]["store"]  # host stays readable for the operator


def test_errors_never_show_secrets(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f'[banks]\npassword = 12345678\nstore = "http://u:{SECRET}@h"\n')
    with pytest.raises(ConfigError) as err:
        load(path=path)
    assert "banks.password" in str(err.value) and "12345678" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load({"INSPECTOR_BANKS_STORE": f"http://u:{SECRET}@h"})
    assert "banks.store" in str(err.value) and SECRET not in str(err.value)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "!$%^*()-_=+[]{};,.~/@:", min_size=1, max_size=40))
def test_mask_url_secrets_hides_any_password(password: str) -> None:
    masked = mask_url_secrets(f"connect redis://user:{password}@redis.local:6379/0 now")
    assert masked == f"connect redis://user:{REDACTED}@redis.local:6379/0 now"


# --------------------------------------------------------------------------- config and wire agree


def test_config_and_wire_share_every_limit_and_the_line_pattern() -> None:
    """The ingest enforces exactly the wire's default limits, and a line name the config accepts
    passes the result header check that every published result goes through (a 65-character line
    used to pass the config and fail every result)."""
    from inspector.wire import LINE_PATTERN, MIB, WireLimits

    import inspector.config as config

    assert WorkerConfig(line="3").ingest.limits() == WireLimits()
    assert config.LINE_PATTERN is LINE_PATTERN and config.MIB == MIB
    assert load(line="a" * 64).line == "a" * 64
    with pytest.raises(ConfigError, match="line"):
        load(line="a" * 65)
    with pytest.raises(ConfigError, match="line"):
        load(line="3.1")  # a dot would let the subscription prefix of line 3 match line 3.1


def test_config_offers_exactly_the_backends_and_calibrations_the_runtime_has() -> None:
    """The config checks ``engine.backend`` and ``engine.calibration`` without importing the model
    (it stays light for the client tools); its lists must be the backend registry's and the
    model's calibration modes, or a config could accept a value the engine then refuses."""
    import inspector.config as config
    from inspector.backends import BACKENDS
    from inspector.model.config import CALIBRATION_MODES

    assert config.BACKENDS == tuple(BACKENDS)
    assert config.CALIBRATIONS == CALIBRATION_MODES


def test_engine_settings_take_the_engine_config_field_by_field() -> None:
    """The worker builds its engine from ``[engine]`` by field name, not position: every value set
    in the config reaches the engine."""
    from inspector.config import EngineConfig
    from inspector.worker.engine import EngineSettings

    e = EngineConfig(artifact="m", device="cpu", precision="fp32", backend="onnx", compiled="p.onnx", threshold=1.5,
                     min_route_similarity=0.5, calibration="bank", threads=3)
    s = EngineSettings.from_config(e, (1, 4), 16)
    assert (s.device, s.backend, s.compiled, s.threshold, s.min_route_similarity, s.calibration, s.threads) == \
        ("cpu", "onnx", "p.onnx", 1.5, 0.5, "bank", 3)
    assert s.batch_sizes == (1, 4) and s.products == 16
