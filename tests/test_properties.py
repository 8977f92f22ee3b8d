"""Property-based tests: whatever a backend or a config file holds, every parser answers with a
value or one of llmtop's own errors, and what reaches a terminal is printable."""

from __future__ import annotations

import asyncio
import json
import math
import unicodedata

import httpx
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtop import inbound
from llmtop.config import BackendConfig, ConfigError, loads_config, parse_config
from llmtop.metrics import MetricNames, MetricsParseError, map_metrics
from llmtop.probe import ProbeError, StreamMeter
from llmtop.providers import adapter_class
from llmtop.redact import MASK, Redactor
from llmtop.sanitize import for_terminal

# Deterministic and bounded: the same examples on every run and every machine, no deadline
# (a loaded CI core is slow, not wrong).
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
HOSTILE_CHARS = st.text(
    alphabet=st.sampled_from(["\x1b", "[", "]", "\x07", "\x9b", "\u202e", "\u2066", "\n", "\r", "\t", "\x00", "\x7f", "a", " ", "é", "日", "\u200b", "\ud800"]),
    max_size=40,
)
ANY_TEXT = st.text(max_size=200) | HOSTILE_CHARS


def printable(text: str) -> bool:
    return all(unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Cn") for ch in text)


def finite_everywhere(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite_everywhere(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite_everywhere(v) for v in value)
    return True


# -- the sanitiser and the redactor -----------------------------------------------------------


@PROPERTY
@given(ANY_TEXT, st.integers(min_value=1, max_value=300))
def test_sanitised_text_is_one_printable_bounded_line(text, limit):
    out = for_terminal(text, limit)
    assert printable(out) and "\n" not in out and len(out) <= limit
    assert for_terminal(out, limit) == out  # sanitising twice changes nothing


SECRET = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=8, max_size=48)


@PROPERTY
@given(SECRET, st.text(max_size=100), st.text(max_size=100), st.integers(min_value=4, max_value=48))
def test_no_key_survives_redaction_whole_or_cut_at_either_end(secret, before, after, cut):
    redact = Redactor([secret])
    assert secret not in redact(before + secret + after)
    assert secret not in redact(json.dumps({"echo": before + secret}))
    cut = min(cut, len(secret) - 1)
    assert not redact(before + secret[:cut]).endswith(secret[:cut])  # cut after: a prefix at the end
    assert not redact(secret[-cut:] + after).startswith(secret[-cut:])  # cut before: a suffix at the start
    assert MASK not in redact("") and redact(before.replace(secret, "")) is not None


# -- numbers, durations, JSON --------------------------------------------------------------------


@PROPERTY
@given(st.text(max_size=60) | st.sampled_from(["inf", "-inf", "nan", "1e999", "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT", "-5", "0x10"]))
def test_retry_after_is_none_or_within_the_clamp(value):
    seconds = inbound.retry_after_s(value)
    assert seconds is None or 0.0 <= seconds <= inbound.MAX_RETRY_AFTER_S


@PROPERTY
@given(JSON)
def test_backend_json_never_carries_a_non_finite_number(value):
    text = json.dumps(value)  # Python writes NaN and Infinity tokens, as some servers do
    notes: list[str] = []
    parsed = inbound.loads(text, notes)
    assert finite_everywhere(parsed)
    assert bool(notes) == (not finite_everywhere(value))  # each one read as absent is noted


@PROPERTY
@given(st.binary(max_size=200))
def test_backend_json_from_any_bytes_is_a_value_or_a_value_error(data):
    try:
        assert finite_everywhere(inbound.loads(data))
    except (ValueError, RecursionError):
        pass


@PROPERTY
@given(st.one_of(st.binary(max_size=200), JSON.map(json.dumps), JSON.map(lambda v: json.dumps(v).encode("utf-16"))))
def test_backend_json_reads_as_json_loads_reads_it_with_non_numbers_absent(data):
    """inbound.loads keeps one decoder for the usual case; it must read exactly what json.loads
    reads, NaN and Infinity as None."""
    try:
        expected = json.loads(data, parse_constant=lambda token: None)
    except (ValueError, RecursionError):
        expected = ValueError
    try:
        got = inbound.loads(data)
    except (ValueError, RecursionError):
        got = ValueError
    assert got == expected


# -- model lists ----------------------------------------------------------------------------------


def adapter(provider: str):
    return adapter_class(provider)(BackendConfig("x", provider, "http://127.0.0.1:9"), None, 1.0, 8)


@PROPERTY
@given(st.sampled_from(["vllm", "ollama", "anthropic", "openai"]), JSON)
def test_a_model_list_parses_to_names_or_a_probe_error(provider, data):
    try:
        names = adapter(provider).parse_models(data)
    except ProbeError:
        return
    assert isinstance(names, tuple) and all(isinstance(n, str) for n in names)


# -- Prometheus pages -----------------------------------------------------------------------------

SAMPLE_VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["NaN", "+Inf", "-Inf", "1e999", "x"])
NAMES = adapter_class("vllm").metric_names


@st.composite
def prometheus_pages(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.sampled_from(["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_sum",
                                     "vllm:time_to_first_token_seconds_count", "vllm:request_time_per_output_token_seconds_sum",
                                     "vllm:request_time_per_output_token_seconds_count", "other_metric"]))
        labels = draw(st.sampled_from(["", '{engine="0"}', '{model_name="a\\"b"}', "{", '{x="\\n"}']))
        value = draw(SAMPLE_VALUES)
        lines.append(f"{name}{labels} {value}")
    if draw(st.booleans()):
        lines.insert(0, "# TYPE vllm:num_requests_waiting gauge")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


@PROPERTY
@given(prometheus_pages() | st.text(max_size=200))
def test_a_metrics_page_maps_to_finite_figures_or_a_parse_error(page):
    try:
        metrics = map_metrics(page, NAMES, None, ("vllm:num_requests_waiting",))
    except MetricsParseError:
        return
    figures = [*metrics.common().values(), *metrics.raw.values()]
    assert all(math.isfinite(v) for v in figures)


def escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def valid_prometheus_pages(draw) -> str:
    """Pages prometheus_client reads: families of samples with any label values (quotes,
    backslashes, braces, commas and newlines escaped as the format says), any float, timestamps."""
    lines = []
    for family in draw(st.lists(st.sampled_from(["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "x_total", "h"]), max_size=4, unique=True)):
        kind = {"x_total": "counter", "h": "histogram"}.get(family, "gauge")
        lines.append(f"# HELP {family} some help with {{braces}} and \\ slashes")
        lines.append(f"# TYPE {family.removesuffix('_total')} {kind}")
        suffixes = ["_bucket", "_sum", "_count"] if kind == "histogram" else [""]
        for _ in range(draw(st.integers(0, 4))):
            labels = draw(st.dictionaries(st.sampled_from(["engine", "model_name", "le", "a_b"]), st.text(max_size=8), max_size=3))
            if "_bucket" in suffixes:
                labels["le"] = draw(st.sampled_from(["0.1", "+Inf"]))
            body = ",".join(f'{k}="{escaped(v)}"' for k, v in labels.items())
            value = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            stamp = draw(st.sampled_from(["", " 1700000000000"]))
            for suffix in suffixes:
                lines.append(f"{family}{suffix}{{{body}}} {value!r}{stamp}" if body or draw(st.booleans()) else f"{family}{suffix} {value!r}{stamp}")
    return "\n".join(lines) + "\n"


@PROPERTY
@given(valid_prometheus_pages())
def test_the_sample_reader_sums_what_prometheus_client_reads(page):
    """metrics.samples replaced prometheus_client's parser on the poll path (for speed);
    prometheus_client stays the oracle of what a page says."""
    from prometheus_client.parser import text_string_to_metric_families

    from llmtop.metrics import _base, parse_samples, select_series

    expected: dict[str, float] = {}
    skipped: list[str] = []
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            if not math.isfinite(sample.value):
                skipped += [sample.name] if sample.name not in skipped else []
                continue
            expected[sample.name] = expected.get(sample.name, 0.0) + sample.value
    for name in [n for n, v in expected.items() if not math.isfinite(v)]:
        del expected[name]
        skipped += [name] if name not in skipped else []
    ignored: list[str] = []
    totals, _ = parse_samples(page, (), ignored)
    assert totals == expected and sorted(ignored) == sorted(skipped)
    # The poll parses only the lines of the series it wants (select_series): the same figures.
    for wanted in ({"vllm:num_requests_running"}, {"h_sum", "h_count", "x"}, {"vllm:kv_cache_usage_perc", "h"}, {"x_total", "h_bucket"}):
        chosen, _ = parse_samples(select_series(page, wanted))
        bases = wanted | {_base(n) for n in wanted}
        assert chosen == {n: v for n, v in expected.items() if n in bases or _base(n) in bases}, wanted


# -- streams: SSE and NDJSON fed in arbitrary pieces -----------------------------------------------


class PiecesStream:
    """What the stream readers use of a response (providers/base.CappedStream), fed given pieces."""

    def __init__(self, pieces: list[str], content_type: str = "text/event-stream"):
        self.headers = httpx.Headers({"content-type": content_type})
        self._pieces = pieces

    async def aiter_text(self):
        for piece in self._pieces:
            yield piece

    async def aiter_bytes(self):
        for piece in self._pieces:
            yield piece.encode("utf-8", "surrogatepass")


def sse_events(draw_json) -> st.SearchStrategy[str]:
    data = st.one_of(
        draw_json.map(lambda v: json.dumps(v)),
        st.sampled_from(["[DONE]", "{not json", "", "NaN", '{"choices": [{"delta": {"content": "hi"}}]}',
                         '{"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}',
                         '{"usage": {"completion_tokens": NaN}}', '{"error": {"message": "\\u001b[2J"}}']),
        st.text(max_size=30),
    )
    field = st.sampled_from(["data: ", "data:", "event: message_stop\ndata: ", ": comment ", "retry: ", "id: "])
    return st.tuples(field, data, st.sampled_from(["\n\n", "\r\n\r\n", "\n", ""])).map(lambda t: t[0] + t[1] + t[2])


@st.composite
def split_stream(draw, events) -> list[str]:
    """Events joined, then cut into pieces anywhere, as proxies split and coalesce chunks."""
    text = "".join(draw(st.lists(events, max_size=12)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(text[last:cut])
        last = cut
    pieces.append(text[last:])
    return pieces


def read(provider: str, pieces: list[str], content_type: str = "text/event-stream"):
    reader = adapter(provider)
    meter = StreamMeter()
    meter.begin()
    try:
        server = asyncio.run(reader.read_stream(PiecesStream(pieces, content_type), meter))
    except ProbeError:
        return meter, None
    return meter, server


@PROPERTY
@given(st.sampled_from(["openai", "vllm", "llamacpp", "anthropic"]), split_stream(sse_events(JSON)))
def test_an_event_stream_reads_to_figures_or_a_probe_error(provider, pieces):
    meter, server = read(provider, pieces)
    for value in (meter.ttft_ms, meter.tokens_per_s, *(server or {}).values()):
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value))
    assert meter.output_tokens >= 0


NDJSON_LINES = st.one_of(
    JSON.map(lambda v: json.dumps(v)),
    st.sampled_from(['{"message": {"content": "x"}, "done": false}', '{"done": true, "eval_count": NaN, "eval_duration": 1e400}',
                     '{"done": true, "eval_count": 8, "eval_duration": -5}', '{"error": "\\u001b]0;x\\u0007"}', "{not json"]),
    st.text(max_size=30),
).map(lambda line: line + "\n")


@PROPERTY
@given(split_stream(NDJSON_LINES))
def test_an_ndjson_stream_reads_to_figures_or_a_probe_error(pieces):
    meter, server = read("ollama", pieces, "application/x-ndjson")
    for value in (meter.ttft_ms, meter.tokens_per_s, *(server or {}).values()):
        assert value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0)


# -- config ---------------------------------------------------------------------------------------

TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
KEYS = st.sampled_from(["name", "provider", "url", "models", "probe_model", "api_key_env", "enabled", "alert", "probe_unloaded",
                        "timeout_s", "metric", "above", "x"])
BACKEND = st.dictionaries(KEYS, st.one_of(TOML_VALUES, st.sampled_from(["vllm", "ollama", "http://h:1", "a\x1bb", "K_ENV"])), max_size=6)
DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "settings": st.dictionaries(st.sampled_from(["timeout_s", "history", "probe_max_tokens", "health_interval_s", "y"]), TOML_VALUES, max_size=3),
        "breaker": st.dictionaries(st.sampled_from(["cooldown_s", "error_rate", "z"]), TOML_VALUES, max_size=2),
        "backend": st.lists(BACKEND, max_size=3) | TOML_VALUES,
    },
)


@PROPERTY
@given(DOCUMENT)
def test_any_config_document_is_a_config_or_one_config_error_line(document):
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):  # not expressible in TOML (NaN keys and the like): nothing to test
        return
    try:
        config = loads_config(text, "fleet.toml")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fleet.toml: ") and "\n" not in message
        return
    for backend in config.backends:
        assert printable(backend.name) and backend.provider


TOML_TEXT = st.text(alphabet=st.sampled_from(list('[]=."\'\n #abcnpruv0159_-{},:\\') + ["\x1b", "\u202e"]), max_size=120)


@PROPERTY
@given(TOML_TEXT | st.text(max_size=200))
def test_any_config_text_is_a_config_or_one_config_error(text):
    try:
        loads_config(text, "f.toml")
    except ConfigError as exc:
        assert str(exc).startswith("f.toml: ")


@PROPERTY
@given(st.dictionaries(st.text(max_size=8), TOML_VALUES, max_size=4))
def test_a_backend_table_of_anything_is_a_backend_or_one_config_error(table):
    try:
        config = parse_config({"backend": [table]}, "f.toml")
    except ConfigError as exc:
        assert str(exc).startswith("f.toml: backend")
        return
    assert len(config.backends) == 1 and printable(config.backends[0].name)


AROUND = st.text(alphabet=" .'\"…,;:()[]{}<>=\n", max_size=20)  # what surrounds a cut key in an error text


@PROPERTY
@given(SECRET.filter(lambda s: len(s) >= 12), AROUND, AROUND, st.integers(min_value=8, max_value=47))
def test_a_piece_of_a_key_cut_off_mid_text_is_masked(secret, before, after, cut):
    redact = Redactor([secret])
    cut = min(cut, len(secret) - 1)
    assert secret[:cut] not in redact(before + secret[:cut] + "..." + after)  # the server cut it and went on
    assert secret[-cut:] not in redact(before + "..." + secret[-cut:] + after)
