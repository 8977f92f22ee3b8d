"""A config error's advice is a line the user can paste: valid TOML, of the type the key wants."""

from __future__ import annotations

import sys

import pytest

from llmtop.config import ConfigError, loads_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKEND = '[[backend]]\nname = "a"\nprovider = "vllm"\nurl = "http://x:1"\n'


@pytest.mark.parametrize(
    "text, advice",
    [
        ('[settings]\ntimeout_s = "10"', "write it without quotes: timeout_s = 10"),
        ('[settings]\ntimeout_s = " 2.5 "', "write it without quotes: timeout_s = 2.5"),
        ('[settings]\ntimeout_s = "ten"', "write a number without quotes, like timeout_s = 10"),
        ('[settings]\ntimeout_s = "10 s"', "write a number without quotes, like timeout_s = 10"),
        ('[settings]\nhistory = "10.5"', "write an integer without quotes, like history = 10"),
        ('[settings]\nhistory = "120"', "write it without quotes: history = 120"),
        (BACKEND + 'enabled = "False"', "write it without quotes: enabled = false"),
        (BACKEND + 'models = "m\\"x"', 'write it as models = ["m\\"x"]'),
        (BACKEND + '[[backend.alert]]\nmetric = "m"\nabove = "0.9"', "write it without quotes: above = 0.9"),
    ],
)
def test_advice_is_valid_toml(text, advice):
    with pytest.raises(ConfigError) as info:
        loads_config(text, "fleet.toml")
    message = str(info.value)
    assert message.endswith(advice), message
    line = advice.split(": ", 1)[-1].split(", like ", 1)[-1].removeprefix("write it as ")
    tomllib.loads(line)  # what it tells the user to write parses


def test_no_advice_that_would_not_parse():
    with pytest.raises(ConfigError) as info:
        loads_config('[settings]\ntimeout_s = "ten"', "fleet.toml")
    assert "timeout_s = ten" not in str(info.value)
