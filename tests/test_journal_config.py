"""The journal's settings: read by both tiers, in the units the names say, a bad value named."""

import pytest

from proxy.app.config import load_filtered_config, load_firehose_config
from proxy.core.errors import ConfigError

JOURNAL_VARIABLES = ["JOURNAL_MEMORY_SECONDS", "JOURNAL_MEMORY_MB", "JOURNAL_DIR", "JOURNAL_RETENTION_HOURS",
                     "JOURNAL_MAX_GB", "PROXY_ENV_FILE"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in JOURNAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POLYGON_API_KEY", "pk")
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's tree


@pytest.mark.parametrize("load", [load_firehose_config, load_filtered_config])
def test_both_tiers_read_the_journal_settings_with_their_defaults(load):
    config = load()
    assert config.journal_memory_seconds == 300 and config.journal_memory_bytes == 256_000_000
    assert config.journal_dir is None
    assert config.journal_retention_seconds == 24 * 3600 and config.journal_max_bytes == 10_000_000_000


@pytest.mark.parametrize("load", [load_firehose_config, load_filtered_config])
def test_the_journal_settings_in_their_units(load, monkeypatch, tmp_path):
    monkeypatch.setenv("JOURNAL_MEMORY_SECONDS", "60")
    monkeypatch.setenv("JOURNAL_MEMORY_MB", "1.5")
    monkeypatch.setenv("JOURNAL_DIR", str(tmp_path / "journal"))  # need not exist yet
    monkeypatch.setenv("JOURNAL_RETENTION_HOURS", "0.5")
    monkeypatch.setenv("JOURNAL_MAX_GB", "2")
    config = load()
    assert config.journal_memory_seconds == 60 and config.journal_memory_bytes == 1_500_000
    assert config.journal_dir == str(tmp_path / "journal")
    assert config.journal_retention_seconds == 1800 and config.journal_max_bytes == 2_000_000_000


def test_zero_means_no_bound_on_disk_and_no_memory_journal(monkeypatch):
    for name in ("JOURNAL_MEMORY_SECONDS", "JOURNAL_MEMORY_MB", "JOURNAL_RETENTION_HOURS", "JOURNAL_MAX_GB"):
        monkeypatch.setenv(name, "0")
    config = load_firehose_config()
    assert config.journal_memory_seconds == 0 and config.journal_memory_bytes == 0
    assert config.journal_retention_seconds is None and config.journal_max_bytes is None


@pytest.mark.parametrize("name, value", [
    ("JOURNAL_MEMORY_SECONDS", "-1"), ("JOURNAL_MEMORY_MB", "lots"), ("JOURNAL_MEMORY_MB", "nan"),
    ("JOURNAL_RETENTION_HOURS", "-2"), ("JOURNAL_MAX_GB", "inf"),
])
def test_a_bad_journal_value_is_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_firehose_config()
    assert raised.value.variable == name


def test_a_journal_dir_that_is_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JOURNAL_DIR", str(tmp_path / "file"))
    with pytest.raises(ConfigError) as raised:
        load_filtered_config()
    assert raised.value.variable == "JOURNAL_DIR" and "not a directory" in str(raised.value)
