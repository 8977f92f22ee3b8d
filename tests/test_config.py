"""Config validation: every mistake a user can make gives one line naming the file, the key and the fix."""

import pytest

from llmtop.config import ConfigError, load_config, loads_config

GOOD = """
[settings]
health_interval_s = 5
probe_interval_s = 60
probe_max_tokens = 8
timeout_s = 10

[breaker]
consecutive_failures = 3
consecutive_successes = 2
window_s = 300
min_requests = 5
error_rate = 0.5
cooldown_s = 30

[[backend]]
name = "gpu1-vllm"
provider = "vllm"
url = "http://10.0.0.5:8000"
models = ["meta-llama/Llama-3.1-8B-Instruct"]
probe_model = "meta-llama/Llama-3.1-8B-Instruct"
api_key_env = "VLLM_API_KEY"
enabled = true
[[backend.alert]]
metric = "vllm:num_requests_waiting"
above = 10

[[backend]]
name = "laptop"
provider = "ollama"
url = "http://127.0.0.1:11434/"
"""


def test_contract_keys_parse():
    config = loads_config(GOOD)
    assert config.settings.timeout_s == 10.0
    assert config.breaker.error_rate == 0.5
    vllm, ollama = config.backends
    assert vllm.alerts[0].metric == "vllm:num_requests_waiting" and vllm.alerts[0].above == 10
    assert vllm.models == ("meta-llama/Llama-3.1-8B-Instruct",) == (vllm.probe_model,)
    assert ollama.url == "http://127.0.0.1:11434"  # trailing slash dropped
    assert ollama.models == () and not ollama.probe_unloaded


def test_sample_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parent.parent / "sample-config.toml")
    assert len(config.backends) >= 5


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ('[[backend]]\nname="a"\nprovider="vlm"\nurl="http://x:1"', "backend 'a'.provider: unknown provider 'vlm'; did you mean 'vllm'?"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="http://x:1"\n[[backend]]\nname="a"\nprovider="vllm"\nurl="http://y:1"', "duplicate backend name 'a'"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="10.0.0.5:8000"', "backend 'a'.url: '10.0.0.5:8000' is not an http(s) URL"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="http://x:99999"', "bad port"),
        ('[settings]\ntimeout_s = "10"', "settings.timeout_s: expected a number, got str '10'; write it without quotes: timeout_s = 10"),
        ('[settings]\ntimeout_s = true', "settings.timeout_s: expected a number"),
        ('[settings]\nprobe_intervall_s = 3', "settings.probe_intervall_s: unknown key (did you mean 'probe_interval_s'?)"),
        ('[setting]\nx=1', "setting: unknown key (did you mean 'settings'?)"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="http://x:1"\nmodel=["m"]', "backend 'a'.model: unknown key (did you mean 'models'?)"),
        ('[[backend]]\nname="a"\nprovider="vllm"', "backend 'a': missing required key 'url'"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="http://x:1"\nmodels="m"', "backend 'a'.models: expected a list"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="http://x:1"\napi_key_env="sk-abc def"', "must be the NAME of an environment variable"),
        ('[[backend]]\nname="a"\nprovider="vllm"\nurl="http://x:1"\n[[backend.alert]]\nmetric="m"', "set exactly one of 'above' or 'below'"),
        ('[breaker]\nerror_rate = 2', "breaker.error_rate: is a fraction between 0 and 1"),
        ('[settings]\ntimeout_s = 0', "settings.timeout_s: must be greater than 0"),
        ("[settings\n", "not valid TOML"),
    ],
)
def test_errors_are_one_line_with_file_and_key(tmp_path, snippet, expected):
    path = tmp_path / "config.toml"
    path.write_text(snippet)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert expected in message
    assert "\n" not in message


def test_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[settings]\ntimeout_s = 10\nprobe_interval_s = \n')
    with pytest.raises(ConfigError, match=r"line 3"):
        load_config(path)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="llmtop init"):
        load_config(tmp_path / "nope.toml")


def test_config_path_resolution(monkeypatch, tmp_path):
    from llmtop.config import resolve_config_path

    monkeypatch.setenv("LLMTOP_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_config_path(None) == tmp_path / "env.toml"
    assert resolve_config_path(str(tmp_path / "flag.toml")) == tmp_path / "flag.toml"
    monkeypatch.delenv("LLMTOP_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert resolve_config_path(None) == tmp_path / "xdg" / "llmtop" / "config.toml"


def test_every_number_has_bounds_that_say_how_to_write_it():
    from llmtop.config import LIMITS

    for key, (low, high) in LIMITS.items():
        table = "settings" if key in ("health_interval_s", "probe_interval_s", "probe_max_tokens", "timeout_s", "max_concurrency",
                                      "probe_concurrency", "slow_ttft_ms", "history", "health_status", "probe_tokens_per_hour",
                                      "price_per_1k_output_tokens", "price_per_1k_input_tokens") else "breaker"
        table = "budget" if key == "tokens_per_hour" else table
        extra = '\nhealth_path = "/h"' if key == "health_status" else ""  # health_status needs a route of its own
        for bad in (low / 10 if isinstance(low, float) and low else None, high * 10):
            if bad is None or (isinstance(low, int) and bad < 1):
                continue
            with pytest.raises(ConfigError) as err:
                loads_config(f"[{table}]\n{key} = {bad!r}{extra}\n", "fleet.toml")
            message = str(err.value)
            assert message.startswith(f"fleet.toml: {table}.{key}: must be at") and f"write it like {key} = " in message
            loads_config(message.rsplit("write it like ", 1)[1].join([f"[{table}]\n", extra + "\n"]), "fleet.toml")  # the advice is valid
