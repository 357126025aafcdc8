"""Prometheus metrics: a real hive with a real worker and the real model, asked over its ZeroMQ
channel (the Metrics frame), over its loopback HTTP port, and through `rbee serve`'s /metrics.
Every exposition is read with prometheus_client's own parser, and counters and histograms must
move by exactly what the jobs did."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zmq

from rbee.catalog import DEFAULT_MODEL
from rbee.errors import AccessDenied, InvalidRequest, ModelNotFound
from rbee.gateway.metrics import expose
from rbee.hive.metrics import HiveMetrics
from rbee.hive.server import Hive
from rbee.hive.settings import HiveConfig
from rbee.keeper.stream import JobStream
from rbee.protocol.messages import (
    Done,
    Frame,
    GenerateParams,
    Metrics,
    MetricsText,
    ModelPulled,
    Progress,
    PullModel,
    StartJob,
    StreamError,
)
from rbee.transport.keys import AuthorizedKeys, load_or_create
from rbee.transport.sockets import Curve, DealerClient, StreamSubscriber
from tests.conftest import free_port
from tests.helpers import hive_in_thread, keeper, run_rbee
from tests.hub_server import FakeHub, FakeRepo
from tests.integration.test_gateway import (
    HUB_FILE,
    HUB_REPO,
    KEY,
    HiveFactory,
    client_for,
    serving,
    start_hive,
)
from tests.integration.test_hive_worker import MODEL, ensure, run_job, start

__all__ = ["start_hive"]  # the fixture, shared with the gateway's tests

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
TEXT_FORMAT = "text/plain; version="  # 0.0.4 or 1.0.0: the same text for rbee's names
PULL_TIMEOUT_S = 60.0


@pytest.fixture
def data_dir(tmp_path: Path, rbee_env: dict[str, str]) -> Path:
    return tmp_path / "data"


def parse(text: str) -> Series:
    """Every sample of an exposition, read by the Prometheus client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in series, f"a series twice: {key}"
            series[key] = sample.value
    return series


def total(series: Series, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in series.items() if n == name and wanted <= have)


def scrape(client: DealerClient) -> Series:
    reply = client.request(Metrics(), 5)
    assert isinstance(reply, MetricsText)
    return parse(reply.text)


def moved(before: Series, after: Series, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def failing_job(
    client: DealerClient, sub: StreamSubscriber, worker_id: str, params: GenerateParams
) -> str:
    """Run a job the worker refuses; its error code."""
    job_id = f"j-{time.monotonic_ns()}"
    sub.subscribe(job_id)
    start(client, job_id, worker_id, params)
    frames = list(JobStream(client, sub, job_id))
    assert isinstance(frames[-1], StreamError), frames[-1]
    return frames[-1].code


def test_jobs_tokens_and_latencies_counted_exactly(data_dir: Path) -> None:
    """Two jobs: +2 done, their exact token counts, +2 in each latency histogram; a bad grammar
    and a prompt too long for the context: +2 under INVALID_REQUEST; a StartJob for a model not
    here: MODEL_NOT_FOUND, with no model label; the worker's load, slots and memory."""
    with hive_in_thread(data_dir, parallel=2) as hive, keeper(hive) as (client, sub):
        assigned, _ = ensure(client, MODEL)
        before = scrape(client)
        at = {"node": "test", "model": MODEL}
        assert total(before, "rbee_model_load_seconds_count", **at) == 1
        load_s = total(before, "rbee_model_load_seconds_sum", **at)
        assert 0 < load_s == pytest.approx(assigned.load_s)
        dones: list[Done] = []
        for n in (6, 11):
            params = GenerateParams(prompt="Count to twenty:", max_tokens=n, temperature=0.0)
            _, done, _ = run_job(client, sub, assigned.worker_id, params)
            assert done.tokens > 1
            dones.append(done)
        grammar = GenerateParams(prompt="hi", max_tokens=4, grammar="root ::= x-undefined")
        assert failing_job(client, sub, assigned.worker_id, grammar) == "INVALID_REQUEST"
        huge = GenerateParams(prompt="colors " * 20_000, max_tokens=4, raw=True)
        assert failing_job(client, sub, assigned.worker_id, huge) == "INVALID_REQUEST"
        with pytest.raises(ModelNotFound):
            nowhere = StartJob(job_id="j-nowhere", model="no-such-model", params=grammar)
            client.request(nowhere, 5)
        after = scrape(client)

    done_at = {**at, "outcome": "done", "code": ""}
    assert moved(before, after, "rbee_jobs_total", **done_at) == 2
    assert moved(before, after, "rbee_jobs_total", outcome="done") == 2
    error = {**at, "outcome": "error", "code": "INVALID_REQUEST"}
    assert moved(before, after, "rbee_jobs_total", **error) == 2
    refused = {"node": "test", "model": "", "outcome": "error", "code": "MODEL_NOT_FOUND"}
    assert total(after, "rbee_jobs_total", **refused) == 1
    assert moved(before, after, "rbee_jobs_total") == 5
    tokens = sum(d.tokens for d in dones)
    assert moved(before, after, "rbee_generated_tokens_total", **at) == tokens
    prompt = sum(d.prompt_tokens for d in dones)
    assert moved(before, after, "rbee_prompt_tokens_total", **at) == prompt
    for histogram in ("rbee_time_to_first_token_seconds", "rbee_inter_token_seconds"):
        assert moved(before, after, f"{histogram}_count", **at) == 2, histogram
        assert moved(before, after, f"{histogram}_bucket", **at, le="+Inf") == 2, histogram
    ttft = sum(d.ttft_s for d in dones)
    assert moved(before, after, "rbee_time_to_first_token_seconds_sum", **at) == pytest.approx(ttft)
    gaps = sum(d.decode_s / (d.tokens - 1) for d in dones)
    assert moved(before, after, "rbee_inter_token_seconds_sum", **at) == pytest.approx(gaps)

    worker = {**at, "worker": assigned.worker_id}
    assert total(after, "rbee_worker_slots", **worker) == 2
    assert total(after, "rbee_worker_slots_busy", **worker) == 0
    assert total(after, "rbee_queue_depth", node="test") == 0
    estimated = total(after, "rbee_worker_memory_estimated_bytes", **worker, memory="ram")
    measured = total(after, "rbee_worker_memory_measured_bytes", **worker, memory="ram")
    assert estimated > 50 << 20 and measured > 50 << 20, (estimated, measured)


def test_the_loopback_port_serves_them_and_nothing_else_is_allowed(
    data_dir: Path, rbee_env: dict[str, str]
) -> None:
    """`--metrics-port` answers on 127.0.0.1 with the same metrics; 0.0.0.0 or a LAN address is
    refused by the hive and by the command line before anything listens."""
    port = free_port()
    with hive_in_thread(data_dir, metrics_port=port) as hive, keeper(hive) as (client, _):
        assert scrape(client)[("rbee_queue_depth", frozenset({("node", "test")}))] == 0
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(TEXT_FORMAT)
        series = parse(answer.text)
        assert series[("rbee_queue_depth", frozenset({("node", "test")}))] == 0
    with pytest.raises(httpx.TransportError):  # stopped with its hive
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    for host in ("0.0.0.0", "192.0.2.7"):
        config = HiveConfig(
            host="127.0.0.1",
            port=0,
            stream_port=0,
            data_dir=data_dir,
            metrics_host=host,
            metrics_port=port,
        )
        with pytest.raises(InvalidRequest, match="loopback only"):
            Hive(config)
    refused = run_rbee("hive", "--metrics-port", f"0.0.0.0:{port}", env=rbee_env, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "INVALID_REQUEST" in refused.stderr and "loopback only" in refused.stderr


def test_a_key_with_the_infer_role_may_ask(data_dir: Path, tmp_path: Path) -> None:
    """On a hive with CURVE, an infer key gets the metrics; an unknown key gets nothing."""
    paired, stranger = load_or_create(tmp_path / "k1"), load_or_create(tmp_path / "k2")
    data_dir.mkdir(parents=True)
    AuthorizedKeys(data_dir).authorize(paired.public, "infer")
    with hive_in_thread(data_dir, secure=True) as hive:
        assert hive.keys is not None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            for pair, allowed in ((paired, True), (stranger, False)):
                curve = Curve(pair.public, pair.secret, hive.keys.public)
                client = DealerClient(ctx, hive.front_endpoint, curve)
                try:
                    if allowed:
                        assert total(scrape(client), "rbee_queue_depth", node="test") == 0
                    else:
                        with pytest.raises(AccessDenied):
                            client.request(Metrics(), 5)
                finally:
                    client.close()
        finally:
            ctx.term()


@pytest.fixture
def hub(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A local Hub serving the default model's bytes to hives in this process."""
    repos = {HUB_REPO: FakeRepo(files={HUB_FILE: model_path.read_bytes()})}
    with FakeHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def pull(client: DealerClient, reference: str) -> Frame:
    """PullModel's final answer (an Error is raised)."""
    rid = client.send(PullModel(reference=reference))
    return next(f for f in client.replies(rid, PULL_TIMEOUT_S) if not isinstance(f, Progress))


def test_downloads_are_counted(data_dir: Path, hub: FakeHub) -> None:
    """A pull adds the file's exact size to the bytes downloaded; one of a repo that does not
    exist is a failure under MODEL_NOT_FOUND."""
    size = len(hub.repos[HUB_REPO].files[HUB_FILE])
    with hive_in_thread(data_dir) as hive, keeper(hive) as (client, _):
        pulled = pull(client, f"hf:{HUB_REPO}")
        assert isinstance(pulled, ModelPulled) and pulled.downloaded
        with pytest.raises(ModelNotFound):
            pull(client, "hf:rbee-test/missing-GGUF")
        series = scrape(client)
    assert total(series, "rbee_download_bytes_total", node="test") == size
    failed = {"node": "test", "code": "MODEL_NOT_FOUND"}
    assert total(series, "rbee_download_failures_total", **failed) == 1
    assert total(series, "rbee_download_failures_total") == 1


# ------------------------------------------------------------------ the gateway


def test_merging_keeps_each_series_once_and_marks_who_answered() -> None:
    """Two hives' texts become one family per metric; a hive met twice (two addresses of one
    hive) counts once; a hive without an answer, or with one that does not parse, is down."""
    a, b = HiveMetrics("a"), HiveMetrics("b")
    for hive in (a, b):
        hive.job_failed("m", "ALL_SLOTS_BUSY")
    answers = [("a", a.text()), ("b", b.text()), ("a", a.text()), ("c", None), ("d", "x y z")]
    series = parse(expose(answers).decode())
    assert total(series, "rbee_jobs_total", code="ALL_SLOTS_BUSY") == 2
    assert total(series, "rbee_jobs_total", node="a") == 1
    up = {dict(labels)["node"]: v for (n, labels), v in series.items() if n == "rbee_hive_up"}
    assert up == {"a": 1, "b": 1, "c": 0, "d": 0}


def gateway_metrics(url: str, **headers: str) -> Series:
    answer = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith(TEXT_FORMAT)
    return parse(answer.text)


def test_the_gateway_exposes_every_hive(
    start_hive: HiveFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rbee serve`'s /metrics: the hive's series under its node, +2 jobs and their exact
    completion tokens after two requests, a bad grammar under INVALID_REQUEST, and
    rbee_hive_up 1 for the hive, 0 for a seed where nothing listens; with --node, that hive
    alone."""
    port = start_hive()
    with serving() as server:
        client = client_for(server)
        client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=2)  # loads it
        before = gateway_metrics(server.url)
        [node] = [dict(labels)["node"] for (n, labels), v in before.items() if n == "rbee_hive_up"]
        assert before[("rbee_hive_up", frozenset({("node", node)}))] == 1
        used = 0
        for n in (5, 9):
            done = client.completions.create(
                model=DEFAULT_MODEL, prompt="Count:", max_tokens=n, temperature=0
            )
            assert done.usage is not None
            used += done.usage.completion_tokens
        with pytest.raises(openai.BadRequestError):
            client.completions.create(
                model=DEFAULT_MODEL,
                prompt="hi",
                max_tokens=4,
                extra_body={"grammar": "root ::= x-undefined"},
            )
        after = gateway_metrics(server.url)
        at = {"node": node, "model": DEFAULT_MODEL}
        assert moved(before, after, "rbee_jobs_total", **at, outcome="done", code="") == 2
        assert moved(before, after, "rbee_generated_tokens_total", **at) == used
        assert moved(before, after, "rbee_time_to_first_token_seconds_count", **at) == 2
        error = {**at, "outcome": "error", "code": "INVALID_REQUEST"}
        assert moved(before, after, "rbee_jobs_total", **error) == 1
        assert total(after, "rbee_queue_depth", node=node) == 0

        dead = f"127.0.0.1:{free_port()}"
        monkeypatch.setenv("RBEE_SEEDS", dead)
        series = gateway_metrics(server.url)
        assert series[("rbee_hive_up", frozenset({("node", dead)}))] == 0
        assert series[("rbee_hive_up", frozenset({("node", node)}))] == 1
    with serving(node=f"127.0.0.1:{port}") as pinned:  # --node: that hive alone
        series = gateway_metrics(pinned.url)
    up = {dict(labels)["node"]: v for (n, labels), v in series.items() if n == "rbee_hive_up"}
    assert up == {node: 1}
    assert total(series, "rbee_jobs_total", node=node) == total(after, "rbee_jobs_total")


def test_the_gateway_wants_its_key_off_loopback(
    rbee_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_API_KEYS", KEY)
    with serving("0.0.0.0:0") as server:  # asked over loopback only
        url = f"http://127.0.0.1:{server.port}"
        refused = httpx.get(url + "/metrics", timeout=10)
        assert refused.status_code == 401
        series = gateway_metrics(url, Authorization=f"Bearer {KEY}")
        assert not [name for name, _ in series if name != "rbee_hive_up"]
