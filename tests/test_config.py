"""Configuration: defaults, tier-prefixed names, .env files, and one clear line on a bad value."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.app.config import load_filtered_config, load_firehose_config, load_simulator_config
from proxy.core.errors import ConfigError
from proxy.core.keys import redact
from proxy.core.outbox import SlowClientPolicy

VENV_BIN = Path(sys.executable).parent
VARIABLES = [
    "POLYGON_API_KEY", "POLYGON_URL", "FIREHOSE_HOST", "FIREHOSE_PORT", "FIREHOSE_SUBSCRIPTIONS",
    "FIREHOSE_API_KEYS", "FIREHOSE_METRICS_PORT", "FIREHOSE_URL", "FILTERED_PROXY_HOST",
    "FILTERED_PROXY_PORT", "FILTERED_PROXY_API_KEYS", "FILTERED_METRICS_PORT", "LOG_LEVEL",
    "UNSUBSCRIBE_GRACE_SECONDS", "CLIENT_QUEUE_EVENTS", "SLOW_CLIENT_POLICY", "SLOW_CLIENT_CLOSE_SECONDS",
    "MAX_MESSAGE_BYTES",
    "AUTH_TIMEOUT_SECONDS", "PROXY_ENV_FILE", "MARKET", "LOG_LEVEL_LIBRARIES", "FILTERED_PROXY_FIREHOSE_KEY",
    "SIMULATOR_EVENTS_PER_SECOND", "SIMULATOR_FRAME_EVENTS", "SIMULATOR_PREBUILT_EVENTS",
    "SIMULATOR_MARKETS", "SIMULATOR_ENTITLED",
    "DOWNSTREAM_PROXY_CONTROL_MESSAGES_PER_SECOND", "DOWNSTREAM_PROXY_MAX_CHANNELS",
    "UPSTREAM_PING_SECONDS", "UPSTREAM_PONG_TIMEOUT_SECONDS",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's tree


def test_firehose_defaults(monkeypatch):
    monkeypatch.setenv("POLYGON_API_KEY", "pk_live_1234567890")
    config = load_firehose_config()
    assert config.upstream_url == "wss://socket.polygon.io/stocks"
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 8767, 9767)
    assert config.api_keys == {"pk_live_1234567890"} and not config.allow_any_key
    assert config.static_channels == () and config.upstream_extra == ()
    assert config.unsubscribe_grace_seconds == 5 and config.auth_timeout_seconds == 10
    assert config.slow_client_policy is SlowClientPolicy.DISCONNECT
    assert config.slow_client_close_seconds == 5


def test_downstream_proxy_limits_are_their_own(monkeypatch):
    config = load_filtered_config()
    assert (config.downstream_proxy_control_messages_per_second, config.downstream_proxy_max_channels) == (1000, 1_000_000)
    assert (config.control_messages_per_second, config.max_channels_per_client) == (50, 10_000)
    monkeypatch.setenv("DOWNSTREAM_PROXY_MAX_CHANNELS", "250000")
    monkeypatch.setenv("DOWNSTREAM_PROXY_CONTROL_MESSAGES_PER_SECOND", "400")
    config = load_filtered_config()
    assert (config.downstream_proxy_control_messages_per_second, config.downstream_proxy_max_channels) == (400, 250_000)
    monkeypatch.setenv("DOWNSTREAM_PROXY_MAX_CHANNELS", "0")
    with pytest.raises(ConfigError, match="DOWNSTREAM_PROXY_MAX_CHANNELS"):
        load_filtered_config()


def test_the_upstream_keepalive_is_read_from_the_environment(monkeypatch):
    config = load_filtered_config()
    assert (config.keepalive_interval_seconds, config.keepalive_timeout_seconds) == (10, 20)
    monkeypatch.setenv("UPSTREAM_PING_SECONDS", "0.5")
    monkeypatch.setenv("UPSTREAM_PONG_TIMEOUT_SECONDS", "1.5")
    config = load_filtered_config()
    assert (config.keepalive_interval_seconds, config.keepalive_timeout_seconds) == (0.5, 1.5)
    monkeypatch.setenv("UPSTREAM_PONG_TIMEOUT_SECONDS", "0")
    with pytest.raises(ConfigError, match="UPSTREAM_PONG_TIMEOUT_SECONDS"):
        load_filtered_config()


def test_filtered_defaults_and_the_any_key_rule(monkeypatch):
    config = load_filtered_config()
    assert config.upstream_url == "ws://localhost:8767"
    assert (config.port, config.metrics_port) == (8765, 9765)
    assert [c.text for c in config.upstream_extra] == ["*"]
    assert config.allow_any_key and not config.api_keys
    monkeypatch.setenv("POLYGON_API_KEY", "fk")
    assert load_filtered_config().api_keys == {"fk"}
    monkeypatch.setenv("FILTERED_PROXY_API_KEYS", "a, b")
    config = load_filtered_config()
    assert config.api_keys == {"a", "b"} and not config.allow_any_key


def test_env_file_and_proxy_env_file(monkeypatch, tmp_path):
    Path(".env").write_text("POLYGON_API_KEY=from_dotenv\nFIREHOSE_SUBSCRIPTIONS=T.*,AM.*\n")
    config = load_firehose_config()
    assert config.upstream_api_key == "from_dotenv"
    assert [c.text for c in config.static_channels] == ["T.*", "AM.*"]
    other = tmp_path / "other.env"
    other.write_text("POLYGON_API_KEY=from_other\nFIREHOSE_PORT=9999\n")
    monkeypatch.setenv("PROXY_ENV_FILE", str(other))
    assert load_firehose_config().port == 9999
    monkeypatch.setenv("FIREHOSE_PORT", "7777")  # the environment wins over the file
    assert load_firehose_config().port == 7777


@pytest.mark.parametrize(
    "variable, value, loader",
    [
        ("FIREHOSE_PORT", "abc", load_firehose_config),
        ("FIREHOSE_PORT", "70000", load_firehose_config),
        ("SLOW_CLIENT_POLICY", "yolo", load_firehose_config),
        ("FIREHOSE_SUBSCRIPTIONS", "T.AAPL,,", load_firehose_config),
        ("POLYGON_URL", "http://x", load_firehose_config),
        ("UNSUBSCRIBE_GRACE_SECONDS", "-1", load_filtered_config),
        ("CLIENT_QUEUE_EVENTS", "0", load_filtered_config),
        ("SLOW_CLIENT_CLOSE_SECONDS", "soon", load_filtered_config),
        ("LOG_LEVEL", "loud", load_filtered_config),
        ("SIMULATOR_EVENTS_PER_SECOND", "fast", load_simulator_config),
        ("SIMULATOR_FRAME_EVENTS", "0", load_simulator_config),
        ("SIMULATOR_FRAME_EVENTS", "1001", load_simulator_config),
        ("SIMULATOR_FRAME_EVENTS", "2.5", load_simulator_config),
        ("SIMULATOR_FRAME_EVENTS", "lumps", load_simulator_config),
        ("SIMULATOR_MARKETS", "stocks,bonds", load_simulator_config),
        ("SIMULATOR_ENTITLED", "options,futures/cme", load_simulator_config),
        ("SIMULATOR_SYMBOLS", "0", load_simulator_config),
        ("UPSTREAM_PING_SECONDS", "0", load_firehose_config),
        ("UPSTREAM_PONG_TIMEOUT_SECONDS", "inf", load_filtered_config),
        ("JOURNAL_MAX_GB", "-1", load_filtered_config),
        ("FILTERED_METRICS_PORT", "65536", load_filtered_config),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, variable, value, loader):
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        loader()
    assert caught.value.variable == variable
    assert variable in str(caught.value)


def test_simulator_frame_events(monkeypatch):
    assert load_simulator_config().frame_events == "adaptive"  # as Polygon frames
    for raw, parsed in (("tick", "tick"), (" Adaptive ", "adaptive"), ("1", 1), ("10", 10), ("1000", 1000)):
        monkeypatch.setenv("SIMULATOR_FRAME_EVENTS", raw)
        assert load_simulator_config().frame_events == parsed
    Path(".env").write_text("SIMULATOR_FRAME_EVENTS=200\n")
    monkeypatch.delenv("SIMULATOR_FRAME_EVENTS")
    assert load_simulator_config().frame_events == 200


def test_simulator_markets_and_entitlement(monkeypatch):
    config = load_simulator_config()
    assert config.markets == config.entitled == ("stocks", "options", "forex", "crypto", "indices", "futures")
    monkeypatch.setenv("SIMULATOR_MARKETS", " Options, stocks ,options")
    monkeypatch.setenv("SIMULATOR_ENTITLED", "stocks")
    config = load_simulator_config()
    assert (config.markets, config.entitled) == (("options", "stocks"), ("stocks",))
    monkeypatch.setenv("SIMULATOR_MARKETS", "bonds")
    with pytest.raises(ConfigError, match=r"SIMULATOR_MARKETS: 'bonds' is not valid: markets must be one or more of stocks, "):
        load_simulator_config()


def test_missing_polygon_key_is_an_error_for_the_firehose():
    with pytest.raises(ConfigError, match="POLYGON_API_KEY: is required"):
        load_firehose_config()


def test_redact_never_shows_a_key_whole():
    key = "pk_live_abcdefghijklmnop"
    assert key not in redact(key) and redact(key).startswith("pk_l")
    assert redact("short") == "*****"


def _trio_run(module: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(VENV_BIN / "trio-run"), module], env={**os.environ, **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )


def test_trio_run_prints_one_line_and_exits_2_on_bad_config():
    process = _trio_run("proxy.firehose", {"POLYGON_API_KEY": "k", "FIREHOSE_PORT": "abc"})
    out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.strip().splitlines() == [
        "configuration error: FIREHOSE_PORT: 'abc' is not valid: expected a port number from 0 to 65535"
    ]
    assert "Traceback" not in out + err


def test_trio_run_usage_and_unknown_module():
    process = _trio_run("proxy.nonexistent", {})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2 and "cannot import" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_trio_run_shuts_down_cleanly_on_a_signal(signum):
    process = _trio_run("proxy.simulator", {"SIMULATOR_PORT": "0"})
    deadline = time.monotonic() + 30
    seen = ""
    while "listening" not in seen and time.monotonic() < deadline:
        seen += process.stderr.readline()
    assert "listening" in seen
    process.send_signal(signum)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "Traceback" not in err and "shutting down" in err


def test_python_dash_m_works_too():
    process = subprocess.run(
        [sys.executable, "-m", "proxy.firehose"], env={**os.environ, "POLYGON_API_KEY": ""},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert process.returncode == 2 and "POLYGON_API_KEY" in process.stderr


def test_env_example_and_readme_document_every_variable_the_code_reads(monkeypatch):
    import re

    from proxy.app.config import declared_variables

    root = Path(__file__).parent.parent
    read = declared_variables()
    assert {"FIREHOSE_PORT", "FILTERED_PROXY_PORT", "SIMULATOR_FRAME_EVENTS", "JOURNAL_MAX_GB",
            "FIREHOSE_API_KEYS"} <= read and len(read) > 50
    example = (root / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", example, flags=re.MULTILINE))
    assert sorted(read - documented - {"PROXY_ENV_FILE"}) == []
    readme = (root / "README.md").read_text()
    assert sorted(name for name in read if f"`{name}`" not in readme) == []
    # ... and nothing else is read: every variable the loaders look up is a declared one
    looked_up: set[str] = set()
    real_getitem = os.environ.__class__.__getitem__

    def watching(self, key):
        looked_up.add(key)
        return real_getitem(self, key)

    monkeypatch.setattr(os.environ.__class__, "__getitem__", watching)
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    for loader in (load_firehose_config, load_filtered_config, load_simulator_config):
        loader()
    assert {name for name in looked_up if name.isupper()} - read == set()
    assert {"FIREHOSE_PORT", "FILTERED_PROXY_PORT", "SIMULATOR_PORT"} <= looked_up


def test_every_setting_is_declared_once_with_its_parser_and_default():
    import attrs

    from proxy.core.settings import SimulatorConfig, TierConfig, TierKind, variable_of

    names: dict[tuple[str, str], str] = {}
    for cls in (TierConfig, SimulatorConfig):
        for field in attrs.fields(cls):
            variable = variable_of(field)
            if variable is None:
                continue
            tiers = (None,) if cls is SimulatorConfig else tuple(TierKind)
            for tier in tiers:
                name = variable.name_for(tier)
                if name is None:
                    continue
                # one field per variable and scope (LOG_LEVEL serves the tiers and the simulator alike)
                key = (cls.__name__ if tier is None else "tier", name)
                assert key not in names or names[key] == field.name, f"{name} is declared twice"
                names[key] = field.name
                default = variable.defaults.get(tier, field.default) if tier else field.default
                assert default is not attrs.NOTHING, f"{name} has no default"
                if field.validator is not None and default is not None:
                    field.validator(None, field, default)  # the default keeps the field's own rule


def test_log_level_is_honoured():
    import logging

    from proxy.app.config import setup_logging

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        setup_logging("warning")
        assert not logging.getLogger("proxy.app.tier").isEnabledFor(logging.INFO)
        assert logging.getLogger("proxy.app.tier").isEnabledFor(logging.WARNING)
        setup_logging("debug")
        assert logging.getLogger("proxy.app.tier").isEnabledFor(logging.DEBUG)
    finally:  # the root logger is global: leave it as the other tests expect it
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_debug_logging_keeps_libraries_at_info_unless_asked():
    import logging

    from proxy.app.config import setup_logging

    try:
        setup_logging("debug")
        assert logging.getLogger("proxy.app.tier").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("trio-websocket").getEffectiveLevel() == logging.INFO
        setup_logging("warning")
        assert logging.getLogger("trio-websocket").getEffectiveLevel() == logging.WARNING
        setup_logging("debug", "debug")
        assert logging.getLogger("trio-websocket").getEffectiveLevel() == logging.DEBUG
    finally:
        setup_logging("info")


def test_log_level_libraries_is_read_and_checked(monkeypatch):
    assert load_filtered_config().library_log_level is None
    monkeypatch.setenv("LOG_LEVEL_LIBRARIES", "debug")
    assert load_filtered_config().library_log_level == "debug"
    monkeypatch.setenv("LOG_LEVEL_LIBRARIES", "loud")
    with pytest.raises(ConfigError, match="LOG_LEVEL_LIBRARIES"):
        load_filtered_config()


def test_a_configuration_built_in_code_is_checked_too():
    from proxy.core.settings import TierConfig

    base = dict(tier="firehose", upstream_url="ws://127.0.0.1:1/stocks", upstream_api_key="k", upstream_extra=(),
                static_channels=(), host="127.0.0.1", port=0, api_keys=frozenset(), allow_any_key=False,
                metrics_port=None)
    assert TierConfig(**base).port == 0
    for field, bad in [("port", 70_000), ("metrics_port", -1), ("client_queue_events", 0), ("market", "bonds"),
                       ("control_messages_per_second", 0.0), ("unsubscribe_grace_seconds", -1.0),
                       ("client_ping_seconds", 0.0), ("tier", "middle")]:
        with pytest.raises(ValueError, match=field if field != "tier" else "middle"):
            TierConfig(**{**base, field: bad})


def test_the_defaults_read_from_the_environment_are_the_fields_defaults(monkeypatch):
    import attrs

    from proxy.core.settings import TierConfig

    monkeypatch.setenv("POLYGON_API_KEY", "k")
    config = load_firehose_config()
    for name in ("market", "client_queue_events", "slow_client_policy", "max_message_bytes", "max_clients",
                 "max_connections_per_ip", "control_messages_per_second", "client_ping_seconds",
                 "unsubscribe_grace_seconds", "journal_memory_seconds"):
        assert getattr(config, name) == attrs.fields_dict(TierConfig)[name].default, name


@pytest.mark.parametrize("value", ["", "/dev/null"])
def test_proxy_env_file_empty_or_dev_null_reads_the_environment_only(monkeypatch, value):
    # a .env in the working directory that must not be read
    Path(".env").write_text("POLYGON_API_KEY=from_dotenv\nFIREHOSE_PORT=9999\n")
    monkeypatch.setenv("PROXY_ENV_FILE", value)
    monkeypatch.setenv("POLYGON_API_KEY", "from_environment")
    config = load_firehose_config()
    assert config.upstream_api_key == "from_environment" and config.port != 9999


def test_proxy_env_file_missing_or_a_directory_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    monkeypatch.setenv("PROXY_ENV_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(ConfigError, match="PROXY_ENV_FILE.*no such file"):
        load_firehose_config()
    monkeypatch.setenv("PROXY_ENV_FILE", str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        load_firehose_config()
