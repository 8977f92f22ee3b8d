"""Parsers and mappers fed the real payloads captured from vLLM, llama-server and the LiteLLM proxy."""

from pathlib import Path

import pytest

from llmtop.metrics import map_metrics, parse_samples
from llmtop.probe import StreamMeter, decode_rate
from llmtop.providers import adapter_class
from llmtop.inbound import retry_after_s
from llmtop.providers.base import error_message
from llmtop.providers.openai import chunk_text
from llmtop.snapshot import Metrics

DATA = Path(__file__).parent / "data"


def read(name):
    return (DATA / name).read_text()


def sse_chunks(name):
    import json

    out = []
    for line in read(name).splitlines():
        if line.startswith("data: ") and line[6:] != "[DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_vllm_stream_role_chunk_and_empty_final_are_not_tokens():
    chunks = sse_chunks("vllm-chat-stream.sse")
    texts = [chunk_text(c) for c in chunks]
    assert texts[0] is None  # role-only with content ""
    assert texts[-2] is None  # empty content with finish_reason
    assert sum(t is not None for t in texts) == 7
    assert chunks[-1]["usage"]["completion_tokens"] == 8  # usage is the truth, not the 7 chunks


def test_litellm_usage_chunk_has_an_empty_delta_choice():
    chunks = sse_chunks("litellm-chat-stream.sse")
    last = chunks[-1]
    assert last["choices"] == [{"index": 0, "delta": {}}]
    assert chunk_text(last) is None and last["usage"]["completion_tokens"] == 19


def test_llamacpp_usage_chunk_carries_server_timings():
    chunks = sse_chunks("llama-server-chat-stream.sse")
    adapter = adapter_class("llamacpp").__new__(adapter_class("llamacpp"))
    timings = adapter.server_timings(chunks[-1])
    assert timings["server_tokens_per_s"] == pytest.approx(83.504, abs=0.01)
    assert timings["server_ttft_ms"] == pytest.approx(30.473)
    assert chunk_text(chunks[0]) is None  # role chunk with content null


def test_models_payloads():
    import json

    openai = adapter_class("vllm").__new__(adapter_class("vllm"))
    openai.models_path = "/v1/models"
    assert openai.parse_models(json.loads(read("vllm-models.json"))) == ("tiny-random-llama",)
    assert openai.parse_models(json.loads(read("llama-server-models.json"))) == ("tiny-random-llama",)
    assert openai.parse_models(json.loads(read("litellm-models.json"))) == ("mock-fast", "mock-slow", "mock-broken")


def test_vllm_metrics_map_to_common_fields():
    names = adapter_class("vllm").metric_names
    m = map_metrics(read("vllm-metrics.prom"), names)
    assert m.requests_running == 0.0 and m.requests_waiting == 0.0 and m.kv_cache_usage == 0.0
    assert m.server_ttft_ms == pytest.approx(36.456, abs=0.01)  # _sum / _count of the real histogram
    assert "vllm:num_requests_waiting" in m.raw and "vllm:time_to_first_token_seconds_bucket" not in m.raw


def test_vllm_old_kv_cache_name_still_maps():
    names = adapter_class("vllm").metric_names
    text = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.42\n"
    assert map_metrics(text, names).kv_cache_usage == pytest.approx(0.42)


def test_server_ttft_over_the_last_interval():
    names = adapter_class("vllm").metric_names
    h = "# TYPE vllm:time_to_first_token_seconds histogram\n"
    first = map_metrics(h + 'vllm:time_to_first_token_seconds_sum 1.0\nvllm:time_to_first_token_seconds_count 10\n', names)
    assert first.server_ttft_ms == pytest.approx(100.0)
    second = map_metrics(h + 'vllm:time_to_first_token_seconds_sum 2.0\nvllm:time_to_first_token_seconds_count 12\n', names, first)
    assert second.server_ttft_ms == pytest.approx(500.0)  # (2.0-1.0)/(12-10)


def test_llamacpp_and_litellm_metrics():
    m = map_metrics(read("llama-server-metrics.prom"), adapter_class("llamacpp").metric_names)
    assert m.requests_running == 0 and m.requests_waiting == 0 and m.kv_cache_usage is None
    lm = map_metrics(read("litellm-metrics.prom"), adapter_class("litellm").metric_names)
    assert lm.requests_running is not None  # litellm_in_flight_requests, found in a long page
    assert lm.server_ttft_ms is not None and lm.server_ttft_ms > 0


def test_kv_cache_takes_the_fullest_engine_and_counts_sum():
    names = adapter_class("vllm").metric_names
    text = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.9\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_running{engine="1"} 4\n'
    )
    m = map_metrics(text, names)
    assert m.kv_cache_usage == pytest.approx(0.9) and m.requests_running == 7


def test_empty_metrics_page_is_not_an_error():
    assert map_metrics("", adapter_class("vllm").metric_names) == Metrics()


def test_garbage_metrics_page_is_a_clear_error():
    from llmtop.metrics import MetricsParseError

    names = adapter_class("vllm").metric_names
    with pytest.raises(MetricsParseError, match="not Prometheus text"):
        map_metrics("<html>\n<body>oops</body>\n", names)


def test_only_wanted_series_are_parsed_but_alert_series_are_kept():
    names = adapter_class("vllm").metric_names
    m = map_metrics(read("vllm-metrics.prom"), names, extra=("vllm:prompt_tokens_total", "vllm:num_preemptions"))
    assert m.raw["vllm:prompt_tokens_total"] >= 0 and "vllm:num_preemptions_total" in m.raw
    assert "python_gc_objects_collected_total" not in m.raw
    full, _ = parse_samples(read("vllm-metrics.prom"))
    assert m.raw["vllm:num_requests_running"] == full["vllm:num_requests_running"]


def test_meter_ttft_and_decode_rate_definitions():
    t = [0.0]
    meter = StreamMeter(clock=lambda: t[0])
    meter.begin()
    t[0] = 0.050
    meter.text("")  # role-only: not a token
    meter.text(None)
    t[0] = 0.200
    meter.text("Hello")
    for i in range(1, 8):
        t[0] = 0.200 + i * 0.010
        meter.text("x")
    assert meter.ttft_ms == pytest.approx(200.0)
    assert meter.tokens_estimated and meter.output_tokens == 8
    assert meter.tokens_per_s == pytest.approx(7 / 0.070)
    meter.usage(15)  # e.g. several tokens per chunk: usage wins
    assert not meter.tokens_estimated and meter.tokens_per_s == pytest.approx(14 / 0.070)


class Reads:
    """Read stamps as the transport gives them: (sequence number, kernel arrival, read time)."""

    def __init__(self) -> None:
        self.seq, self.arrived = 0, 0.0

    def read(self, arrived: float) -> None:
        self.seq, self.arrived = self.seq + 1, arrived

    def __call__(self) -> tuple[int, float, float]:
        return self.seq, self.arrived, self.arrived


def test_a_last_token_read_with_the_end_marker_is_not_the_rate_s_end():
    reads = Reads()
    meter = StreamMeter(reads=reads)
    for i in range(7):  # tokens at 0.100, 0.110, ... 0.160, each read alone
        reads.read(0.100 + i * 0.010)
        meter.text("x")
    reads.read(0.250)  # the 8th token (sent at 0.170) read late, with the end marker sent at 0.250
    meter.text("x")
    meter.event()
    assert meter.tokens_per_s == pytest.approx(6 / 0.060)  # to the 7th, whose stamp is its own
    meter.usage(15)  # two tokens a chunk, by the server's count: the same share of it
    assert meter.tokens_per_s == pytest.approx(14 * 6 / 7 / 0.060)  # 12 of the 14 tokens after the first


def test_a_last_token_alone_in_its_read_ends_the_rate():
    reads = Reads()
    meter = StreamMeter(reads=reads)
    for i in range(8):
        reads.read(0.100 + i * 0.010)
        meter.text("x")
    reads.read(0.250)
    meter.event()  # the end marker, in a read of its own
    assert meter.tokens_per_s == pytest.approx(7 / 0.070)


def test_no_rate_when_no_token_after_the_first_has_its_own_stamp():
    reads = Reads()
    meter = StreamMeter(reads=reads)
    reads.read(0.100)
    meter.text("x")
    reads.read(0.300)  # the second token and the end marker together
    meter.text("x")
    meter.text(None)  # a chunk without text counts as a later chunk too
    assert meter.ttft_ms is not None and meter.tokens_per_s is None


def test_decode_rate_edges():
    assert decode_rate(1, 0.1, 0.1) is None
    assert decode_rate(5, 0.1, 0.1) is None
    assert decode_rate(5, None, 0.2) is None
    assert decode_rate(3, 1.0, 2.0) == 2.0


def test_retry_after_and_error_messages():
    assert retry_after_s("30") == 30.0
    assert retry_after_s(None) is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert retry_after_s("soon") is None
    assert error_message(b'{"error":{"message":"model x not found","type":"invalid_request_error"}}') == "model x not found"
    assert error_message(b'{"error":"model \\"x\\" not found, try pulling it first"}').startswith("model")
    assert error_message(b"<html>\n  Bad   gateway</html>") == "<html> Bad gateway</html>"


def test_server_decode_rate_from_tpot_histograms_and_gauges():
    m = map_metrics(read("vllm-metrics.prom"), adapter_class("vllm").metric_names)
    full, _ = parse_samples(read("vllm-metrics.prom"))
    tpot = full["vllm:request_time_per_output_token_seconds_sum"] / full["vllm:request_time_per_output_token_seconds_count"]
    assert m.server_tokens_per_s == pytest.approx(1 / tpot)
    llama = map_metrics(read("llama-server-metrics.prom"), adapter_class("llamacpp").metric_names)
    assert llama.server_tokens_per_s == pytest.approx(83.5043)
    tgi = adapter_class("tgi").metric_names
    h = "# TYPE tgi_request_mean_time_per_token_duration histogram\n"
    first = map_metrics(h + "tgi_request_mean_time_per_token_duration_sum 0.2\ntgi_request_mean_time_per_token_duration_count 10\n", tgi)
    assert first.server_tokens_per_s == pytest.approx(50.0)
    later = map_metrics(h + "tgi_request_mean_time_per_token_duration_sum 0.3\ntgi_request_mean_time_per_token_duration_count 20\n", tgi, first)
    assert later.server_tokens_per_s == pytest.approx(100.0)  # the last interval's 10 requests at 10 ms


def test_a_server_restart_never_makes_a_negative_server_ttft():
    names = adapter_class("vllm").metric_names
    page = "# TYPE vllm:time_to_first_token_seconds histogram\nvllm:time_to_first_token_seconds_sum {}\nvllm:time_to_first_token_seconds_count {}\n"
    before = map_metrics(page.format(100.0, 1000), names)
    after_restart = map_metrics(page.format(0.3, 1003), names, before)  # the sum started over; the count, by chance, did not
    assert after_restart.server_ttft_ms == pytest.approx(0.3 / 1003 * 1000)
    later = map_metrics(page.format(0.6, 1006), names, after_restart)
    assert later.server_ttft_ms == pytest.approx(100.0)
