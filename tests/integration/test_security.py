"""CURVE, keys and pairing on a LAN of namespaces: a hive on one host listening on its LAN
address (so CURVE is on), keepers on another. Everything through the rbee command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rbee.errors import ExitCode
from tests.integration.test_lan import env_for, hive_on, nodes, pair, rbee_on, wait_listed
from tests.lan import Host, Lan, available, leftover_namespaces

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "LAN available")


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan.create(2, subnet=3) as lan:
        yield lan
    assert leftover_namespaces(lan.tag) == []


def test_closed_by_default_then_paired(
    lan: Lan, rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    h1, h2 = lan.hosts
    hive_env, keeper = (
        env_for(h1, rbee_env, tmp_path, "alpha"),
        env_for(h2, rbee_env, tmp_path, "k"),
    )
    stranger = env_for(h2, rbee_env, tmp_path, "stranger")
    with hive_on(h1, hive_env, "alpha"):
        wait_listed(h2, keeper, {"alpha"})
        listed = nodes(h2, keeper)
        assert listed[0]["state"].startswith("unreachable (not paired"), listed
        refused = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert refused.returncode == ExitCode.ACCESS and "not paired" in refused.stderr
        plain = rbee_on(h2, keeper, "infer", "--node", f"{h1.address}:7830", "-n", "4", "Hi")
        assert plain.returncode == ExitCode.ACCESS, plain.stderr
        assert "only talks to keepers it has paired with" in plain.stderr

        wrong = pair(h1, hive_env, h2, keeper, code_used="0000-0000")
        assert wrong.returncode == ExitCode.ACCESS and "wrong pairing code" in wrong.stderr
        authorized = Path(hive_env["RBEE_DATA_DIR"]) / "keys" / "authorized_keys"
        assert not authorized.exists() or authorized.read_text() == ""
        assert "alpha" not in rbee_on(h2, keeper, "keys", "known").stdout

        paired = pair(h1, hive_env, h2, keeper)
        assert paired.returncode == 0 and "paired with alpha" in paired.stderr + paired.stdout
        ran = rbee_on(h2, keeper, "infer", "-t", "0", "-n", "16", "Why is the sky blue?")
        assert ran.returncode == 0 and "[done] 16 tokens" in ran.stderr, ran.stderr
        assert f"chose alpha ({h1.address}:7830)" in ran.stderr

        # An infer key may not pull or stop workers; an unknown key gets nothing at all.
        pull = rbee_on(h2, keeper, "models", "pull", "--node", "alpha", "hf:org/repo")
        assert pull.returncode == ExitCode.ACCESS and "admin role" in pull.stderr
        worker = re.search(r"on worker (w-\w+)", ran.stderr)
        assert worker is not None
        stop = rbee_on(h2, keeper, "workers", "stop", worker.group(1), "--node", "alpha")
        assert stop.returncode == ExitCode.ACCESS, stop.stderr
        rbee_on(h2, stranger, "keys", "show")
        known = Path(keeper["RBEE_DATA_DIR"]) / "keys" / "known_hives"
        (Path(stranger["RBEE_DATA_DIR"]) / "keys" / "known_hives").write_text(known.read_text())
        unknown = rbee_on(h2, stranger, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert (
            unknown.returncode == ExitCode.ACCESS and "refused this keeper's key" in unknown.stderr
        )

        # Hostile model references from the network.
        for ref in ("file:/etc/passwd", f"file:{model_path}", "synthetic:0"):
            bad = rbee_on(h2, keeper, "infer", "--node", "alpha", "-m", ref, "-n", "2", "Hi")
            assert bad.returncode == ExitCode.USAGE and "INVALID_REQUEST" in bad.stderr, ref
        for ref in ("../../etc/passwd", "hf:../../etc", "hf:org/repo/../../x.gguf"):
            bad = rbee_on(h2, keeper, "infer", "--node", "alpha", "-m", ref, "-n", "2", "Hi")
            assert bad.returncode in (ExitCode.USAGE, ExitCode.MODEL), (ref, bad.stderr)

        # Revoked: refused on the next request.
        keeper_key = rbee_on(h2, keeper, "keys", "show").stdout.split()[0]
        revoked = rbee_on(h1, hive_env, "hive", "revoke", keeper_key)
        assert revoked.returncode == 0, revoked.stderr
        after = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert after.returncode == ExitCode.ACCESS, after.stderr


def test_a_changed_hive_key_is_refused(lan: Lan, rbee_env: dict[str, str], tmp_path: Path) -> None:
    h1, h2 = lan.hosts
    hive_env, keeper = (
        env_for(h1, rbee_env, tmp_path, "alpha"),
        env_for(h2, rbee_env, tmp_path, "k"),
    )
    with hive_on(h1, hive_env, "alpha"):
        wait_listed(h2, keeper, {"alpha"})
        assert pair(h1, hive_env, h2, keeper).returncode == 0
    (Path(hive_env["RBEE_DATA_DIR"]) / "keys" / "node.key").unlink()  # reinstalled: a new key
    with hive_on(h1, hive_env, "alpha"):
        wait_listed(h2, keeper, {"alpha"})
        changed = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert changed.returncode == ExitCode.ACCESS and "HIVE_KEY_CHANGED" in changed.stderr
        assert "rbee keys forget alpha" in changed.stderr
        by_address = rbee_on(h2, keeper, "infer", "--node", f"{h1.address}:7830", "-n", "4", "Hi")
        assert by_address.returncode == ExitCode.ACCESS, by_address.stderr
        assert "HIVE_KEY_CHANGED" in by_address.stderr


def test_a_world_readable_private_key_is_refused(rbee_env: dict[str, str]) -> None:
    from tests.helpers import run_rbee

    shown = run_rbee("keys", "show", env=rbee_env)
    assert shown.returncode == 0 and shown.stdout.split()[1].startswith("SHA256:")
    key_file = Path(rbee_env["RBEE_DATA_DIR"]) / "keys" / "node.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    os.chmod(key_file, 0o644)
    refused = run_rbee("keys", "show", env=rbee_env)
    assert refused.returncode == ExitCode.ACCESS and "readable by others" in refused.stderr
    assert "secret" not in refused.stderr and "chmod 600" in refused.stderr


IMPOSTOR = """
import socket, sys, threading
from rbee import __version__, discovery
from rbee.protocol.messages import PROTOCOL_VERSION
address, node, node_id = sys.argv[1], sys.argv[2], sys.argv[3]
received = []
def serve(listener):  # a plaintext endpoint that records every byte anyone sends it
    while True:
        conn, _ = listener.accept()
        conn.settimeout(0.5)
        try:
            while data := conn.recv(65536):
                received.append(data)
        except OSError:
            pass
listeners = []
for port in (7830, 7831):
    listener = socket.create_server((address, port))
    listeners.append(listener)
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
announcer = discovery.Announcer(discovery.Announcement(
    node=node, node_id=node_id, address=address, port=7830, stream_port=7831,
    rbee_version=__version__, protocol_version=PROTOCOL_VERSION, key="",
    cluster=discovery.cluster()), [address])
print("IMPOSTOR-READY", flush=True)
sys.stdin.read()  # until the test is done
announcer.close()
print("RECEIVED", sum(len(d) for d in received), flush=True)
"""


@pytest.mark.parametrize("same_node_id", [True, False])
def test_an_impostor_announcing_no_key_is_never_sent_a_byte(
    rbee_env: dict[str, str], tmp_path: Path, same_node_id: bool
) -> None:
    """A host announces the paired hive's name (with its node id, or a new one) but no key and
    serves plaintext: the keeper lists it as such, and `rbee infer` (chosen, and --node alpha)
    goes to the real hive; the impostor receives nothing, not even a greeting."""
    with Lan.create(3, subnet=4 + same_node_id) as lan:
        h1, h2, h3 = lan.hosts
        hive_env, keeper = (
            env_for(h1, rbee_env, tmp_path, "alpha"),
            env_for(h2, rbee_env, tmp_path, "k"),
        )
        attacker = env_for(h3, rbee_env, tmp_path, "attacker")
        with hive_on(h1, hive_env, "alpha"):
            wait_listed(h2, keeper, {"alpha"})
            assert pair(h1, hive_env, h2, keeper).returncode == 0
            real_id = (Path(hive_env["RBEE_DATA_DIR"]) / "node_id").read_text().strip()
            fake_id = real_id if same_node_id else "f" * 32
            impostor = subprocess.Popen(
                h3.argv([sys.executable, "-c", IMPOSTOR, h3.address, "alpha", fake_id]),
                env=attacker,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert impostor.stdout is not None
                while (line := impostor.stdout.readline()) and line != "IMPOSTOR-READY\n":
                    pass
                assert line, "the impostor did not start"
                deadline = time.monotonic() + 10
                while len(listed := nodes(h2, keeper)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.3)
                fake = [n for n in listed if str(n["address"]).startswith(h3.address)]
                assert fake and "announces no key" in str(fake[0]["state"]), listed
                for args in ((), ("--node", "alpha")):
                    ran = rbee_on(h2, keeper, "infer", *args, "-t", "0", "-n", "8", "Hi")
                    assert ran.returncode == 0, ran.stderr
                    assert f"({h1.address}:7830)" in ran.stderr or "--node" in args, ran.stderr
                direct = rbee_on(
                    h2, keeper, "infer", "--node", f"{h3.address}:7830", "-n", "4", "Hi"
                )
                assert direct.returncode == ExitCode.ACCESS, direct.stderr
                assert "never sends a request in clear" in direct.stderr
            finally:
                out, _ = impostor.communicate(input="", timeout=30)
    assert impostor.returncode == 0 and "RECEIVED 0\n" in out, f"the impostor got bytes: {out!r}"


SNOOP = """
import json, sys, time, zmq
from rbee.errors import RbeeError
from rbee.keeper.link import curve_for, hello
from rbee.protocol.messages import Cancel, FetchFrames, ListWorkers
from rbee.transport.sockets import StreamSubscriber
host, job_id = sys.argv[1], ""
ctx = zmq.Context()
curve = curve_for(f"{host}:7830")
client, reply = hello(ctx, host, 7830, (3.0,), curve)
stream = f"tcp://{host}:{reply.stream_port}"
everything = StreamSubscriber(ctx, stream, 10_000, curve)
for prefix in (b"", b"j", b"j-"):  # a PUB/SUB topic is a prefix match
    everything.sock.setsockopt(zmq.SUBSCRIBE, prefix)
print("SNOOP-READY", flush=True)
job_id = sys.stdin.readline().strip()
exact = StreamSubscriber(ctx, stream, 10_000, curve)
exact.subscribe(job_id)
exact.sock.setsockopt(zmq.SUBSCRIBE, job_id.encode())
def outcome(frame):
    try:
        return type(client.request(frame, 5.0)).__name__
    except RbeeError as exc:
        return exc.code
seen = [w.job_id for w in client.request(ListWorkers(), 5.0).workers]
fetched, canceled = outcome(FetchFrames(job_id=job_id, from_seq=0)), outcome(Cancel(job_id=job_id))
received, deadline = 0, time.monotonic() + 2.0
while time.monotonic() < deadline:
    received += sum(1 for sub in (everything, exact) if sub.recv(0.05) is not None)
print(json.dumps({"seen": seen, "fetched": fetched, "canceled": canceled, "received": received}))
"""


def test_a_key_cannot_hear_fetch_list_or_cancel_another_keys_job(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    """Two keepers paired with the infer role: while one streams a job, the other, knowing even
    the job's id, receives no frame of it on any topic, does not see the id listed, cannot fetch
    or cancel it. An admin key may cancel it, and the owner is told that an admin did."""
    with Lan.create(3, subnet=6) as lan:
        h1, h2, h3 = lan.hosts
        hive_env = env_for(h1, rbee_env, tmp_path, "alpha")
        owner = env_for(h2, rbee_env, tmp_path, "owner")
        other, admin = (env_for(h3, rbee_env, tmp_path, name) for name in ("other", "admin"))
        with hive_on(h1, hive_env, "alpha"):
            wait_listed(h2, owner, {"alpha"})
            for host, env, role in (
                (h2, owner, "infer"),
                (h3, other, "infer"),
                (h3, admin, "admin"),
            ):
                assert pair(h1, hive_env, host, env, role=role).returncode == 0
            long_job = ("infer", "--node", "alpha", "-t", "0", "-n", "400", "--ignore-eos", "Hi")

            def started(job: subprocess.Popen[str]) -> str:
                assert job.stderr is not None
                lines = []
                while line := job.stderr.readline():
                    lines.append(line)
                    if found := re.search(r"job (j-[0-9a-f]+) on worker", line):
                        return found.group(1)
                raise AssertionError(f"the job did not start: {''.join(lines)}")

            snoop = subprocess.Popen(
                h3.argv([sys.executable, "-c", SNOOP, h1.address]),
                env=other,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert snoop.stdout is not None and snoop.stdout.readline() == "SNOOP-READY\n"
            victim = subprocess.Popen(
                h2.argv([sys.executable, "-m", "rbee", *long_job]),
                env=owner,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            job_id = started(victim)
            out, _ = snoop.communicate(input=job_id + "\n", timeout=60)
            report = json.loads(out.splitlines()[-1])
            assert report == {
                "seen": [""],
                "fetched": "JOB_NOT_FOUND",
                "canceled": "JOB_NOT_FOUND",
                "received": 0,
            }, report
            text, rest = victim.communicate(timeout=60)
            assert victim.returncode == 0 and "[done] 400 tokens" in rest, rest
            assert len(text) > 400

            victim = subprocess.Popen(
                h2.argv([sys.executable, "-m", "rbee", *long_job]),
                env=owner,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            job_id = started(victim)
            cancel = ADMIN_CANCEL.format(host=h1.address, job_id=job_id)
            by_admin = subprocess.run(
                h3.argv([sys.executable, "-c", cancel]), env=admin, capture_output=True, text=True
            )
            listed, detail = by_admin.stdout.splitlines()[-2:]
            assert job_id in listed and "as admin" in detail, by_admin.stdout + by_admin.stderr
            _, rest = victim.communicate(timeout=60)
            assert victim.returncode == ExitCode.STOPPED, rest
            assert "JOB_STOPPED" in rest and "stopped by an admin key (SHA256:" in rest, rest
            assert "the partial text is saved" in rest, rest


ADMIN_CANCEL = """
import zmq
from rbee.keeper.link import curve_for, hello
from rbee.protocol.messages import Cancel, ListWorkers
client, _ = hello(zmq.Context(), "{host}", 7830, (3.0,), curve_for("{host}:7830"))
print([w.job_id for w in client.request(ListWorkers(), 5.0).workers])
print(client.request(Cancel(job_id="{job_id}"), 5.0).detail)
"""


def attacked(
    pid: int, argv: list[str], env: dict[str, str], limit_s: float
) -> tuple[subprocess.Popen[str], str, str, float]:
    """Run an attack (killed after ``limit_s``) while sampling process ``pid``'s RSS: the
    attack, its output and error, and by how many MiB the target's RSS peaked above its start."""
    rss = psutil.Process(pid)
    baseline = peak = rss.memory_info().rss
    attack = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + limit_s
    while attack.poll() is None and time.monotonic() < deadline:
        peak = max(peak, rss.memory_info().rss)
        time.sleep(0.02)
    attack.kill()
    out, err = attack.communicate()
    return attack, out, err, (peak - baseline) / 2**20


BOMBER = """
import json, sys, threading, time, zmq
from rbee.keeper.link import curve_for, hello
from rbee.keeper.stream import JobStream
from rbee.protocol.messages import GenerateParams, Hello, StartJob, new_job_id
from rbee.transport.sockets import StreamSubscriber
host = sys.argv[1]
ctx = zmq.Context()
curve = curve_for(f"{host}:7830")
client, reply = hello(ctx, host, 7830, (3.0,), curve)
latencies, failures, done = [], [], threading.Event()
def probe():  # a paired keeper's requests, on their own connection, all along
    own, _ = hello(ctx, host, 7830, (3.0,), curve)
    while not done.is_set():
        started = time.monotonic()
        try:
            own.request(Hello(client="probe"), 1.0)
            latencies.append(time.monotonic() - started)
        except Exception as exc:
            failures.append(repr(exc))
        time.sleep(0.05)
prober = threading.Thread(target=probe)
prober.start()
HEAD = b"\\x84\\xa1v\\x01\\xa1t\\xa9start_job\\xa1r\\x01\\xa1b"
flat = HEAD + b"\\xdd" + (16 << 20).to_bytes(4, "big") + b"\\x90" * (16 << 20)
inner = b"\\xdc\\x00\\x78" + b"\\x90" * 120
nested = HEAD + b"\\xdc\\x01\\x00" + (b"\\xdc\\x01\\x00" + inner * 256) * 256
raw = ctx.socket(zmq.DEALER)
raw.linger = 0
raw.curve_serverkey, raw.curve_publickey, raw.curve_secretkey = (
    curve.server.encode(), curve.public.encode(), curve.secret.encode())
raw.connect(f"tcp://{host}:7830")
for bomb in [flat] * 3 + [nested] * 20:  # 16 MiB frames, then 8 MiB ones of 8 M empty lists
    raw.send(bomb)
    time.sleep(0.1)
print("bombs sent", file=sys.stderr, flush=True)
for _ in range(15):  # jobs whose keeper never listens, each 1 Mi characters (the queue holds 16)
    client.send(StartJob(job_id=new_job_id(), model="smollm2-135m-instruct",
                         params=GenerateParams(prompt="word " * 200_000, raw=True)))
job_id, started = new_job_id(), time.monotonic()
sub = StreamSubscriber(ctx, f"tcp://{host}:{reply.stream_port}", 10_000, curve)
sub.subscribe(job_id)
time.sleep(0.3)
params = GenerateParams(prompt="word " * 200_000, raw=True, max_tokens=4)
try:
    client.request(StartJob(job_id=job_id, model="smollm2-135m-instruct", params=params), 10.0)
    end = list(JobStream(client, sub, job_id))[-1]
    long_prompt = [end.code, end.message, time.monotonic() - started]
    time.sleep(2.0)
finally:
    done.set()
    prober.join()
print(json.dumps({"max_hello_s": max(latencies), "hellos": len(latencies),
                  "failures": failures, "long_prompt": long_prompt}))
"""


def test_bombs_and_huge_requests_leave_the_hive_small_and_answering(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    """A paired keeper's key sends msgpack bombs (16 MiB frames, and 8 MiB ones that decode to
    8 M empty lists), 15 jobs of 1 Mi characters it never listens to and a prompt that cannot
    fit the context: the hive's RSS grows by less than 64 MiB, another connection's requests are
    all answered within 1 s, the worker is not killed, and the long prompt is refused at once."""
    with Lan.create(2, subnet=7) as lan:
        h1, h2 = lan.hosts
        hive_env, keeper = (
            env_for(h1, rbee_env, tmp_path, "alpha"),
            env_for(h2, rbee_env, tmp_path, "k"),
        )
        with hive_on(h1, hive_env, "alpha") as hive:
            wait_listed(h2, keeper, {"alpha"})
            assert pair(h1, hive_env, h2, keeper).returncode == 0
            first = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
            assert first.returncode == 0, first.stderr
            worker = re.search(r"on worker (w-\w+)", first.stderr)
            assert worker is not None
            attack, out, err, grew_mib = attacked(
                hive.pid, h2.argv([sys.executable, "-c", BOMBER, h1.address]), keeper, 90
            )
            assert attack.returncode == 0, err
            report = json.loads(out.splitlines()[-1])
            print(f"hive grew {grew_mib:.1f} MiB; {report}")
            assert grew_mib < 64, f"the hive grew by {grew_mib:.0f} MiB"
            assert report["failures"] == [] and report["hellos"] > 20, report
            assert report["max_hello_s"] < 1.0, report
            code, message, took_s = report["long_prompt"]
            assert code == "INVALID_REQUEST" and "at least" in message and took_s < 5, report
            after = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
            assert after.returncode == 0 and f"on worker {worker.group(1)}" in after.stderr


def hive_pairing(host: Host, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`rbee hive pair` running on ``host``, and its code."""
    argv = [sys.executable, "-m", "rbee", "hive", "pair", "--node-name", "alpha"]
    server = subprocess.Popen(
        host.argv([*argv, "--role", "infer", "--timeout", "60s"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    code = re.search(r"\d{4}-\d{4}", server.stdout.readline())
    assert code is not None
    return server, code.group(0)


RELAY = """
import sys, dataclasses, zmq
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import PairAccepted
mine, hive = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
front.bind(f"tcp://{mine}:7832")
back.connect(f"tcp://{hive}:7832")
print("RELAY-READY", flush=True)
poller, keeper = zmq.Poller(), b""
poller.register(front, zmq.POLLIN)
poller.register(back, zmq.POLLIN)
while True:
    for sock, _ in poller.poll():
        if sock is front:
            keeper, data = front.recv_multipart()
            back.send(data)
        else:
            env = decode(back.recv())
            frame = env.frame
            if isinstance(frame, PairAccepted):  # send the keeper to the relay's own port
                frame = dataclasses.replace(frame, router_port=9999)
            front.send_multipart([keeper, encode(frame, env.rid)])
"""


def test_a_relay_that_changes_any_field_of_the_answer_fails_pairing(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    """A host between keeper and hive relays pairing faithfully but for the router port in
    PairAccepted: the keeper refuses the answer and pins nothing."""
    with Lan.create(3, subnet=8) as lan:
        h1, h2, h3 = lan.hosts
        hive_env, keeper = (
            env_for(h1, rbee_env, tmp_path, "alpha"),
            env_for(h2, rbee_env, tmp_path, "k"),
        )
        relay = subprocess.Popen(
            h3.argv([sys.executable, "-c", RELAY, h3.address, h1.address]),
            env=env_for(h3, rbee_env, tmp_path, "relay"),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert relay.stdout is not None and relay.stdout.readline() == "RELAY-READY\n"
            server, code = hive_pairing(h1, hive_env)
            paired = rbee_on(h2, keeper, "pair", f"{h3.address}:7830", code)
            server.communicate(timeout=30)
        finally:
            relay.kill()
            relay.wait()
        assert paired.returncode == ExitCode.ACCESS, paired.stdout + paired.stderr
        assert "does not match the code: not paired" in paired.stderr
        known = Path(keeper["RBEE_DATA_DIR"]) / "keys" / "known_hives"
        assert not known.exists() or "9999" not in known.read_text()


PAIRING_ABUSE = """
import json, os, sys, time, zmq
from pathlib import Path
from rbee.errors import RbeeError
from rbee.pairing import pair_with
from rbee.protocol.codec import encode
from rbee.protocol.messages import PairHello
host = sys.argv[1]
ctx = zmq.Context()
def dealer():
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{host}:7832")
    return sock
raw = dealer()
HEAD = b"\\x84\\xa1v\\x01\\xa1t\\xaapair_hello\\xa1r\\x01\\xa1b"
for _ in range(3):  # 16 MiB of empty lists, as the old 64 MiB limit let through
    raw.send(HEAD + b"\\xdd" + (16 << 20).to_bytes(4, "big") + b"\\x90" * (16 << 20))
    time.sleep(0.2)
raw = dealer()
for _ in range(200):  # small frames that are nothing but containers
    raw.send(HEAD + b"\\xdc\\x0f\\x90" + b"\\x9f" + b"\\x90" * 15 * 4000)
flood = [dealer() for _ in range(200)]
for sock in flood:  # a hello flood; the SPAKE2 messages are noise
    sock.send(encode(PairHello(msg=os.urandom(33)), 1))
time.sleep(1.0)
guesses = []
for _ in range(5):  # complete exchanges with a wrong code
    time.sleep(0.6)
    try:
        pair_with(Path(os.environ["RBEE_DATA_DIR"]), host, 7832, "0000-0000")
        guesses.append("paired")
    except RbeeError as exc:
        guesses.append(exc.message)
print(json.dumps(guesses))
"""


def test_pairing_survives_bombs_floods_and_a_guesser_voiding_the_code(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    """While `rbee hive pair` waits, a LAN host sends it msgpack bombs, 200 noise hellos and five
    wrong-code exchanges: its RSS grows by less than 64 MiB, the guesser is ignored after three,
    the code is not void, and the real keeper then pairs."""
    with Lan.create(3, subnet=9) as lan:
        h1, h2, h3 = lan.hosts
        hive_env, keeper = (
            env_for(h1, rbee_env, tmp_path, "alpha"),
            env_for(h2, rbee_env, tmp_path, "k"),
        )
        server, code = hive_pairing(h1, hive_env)
        try:
            time.sleep(0.5)
            attacker = env_for(h3, rbee_env, tmp_path, "attacker")
            argv = h3.argv([sys.executable, "-c", PAIRING_ABUSE, h1.address])
            attack, out, err, grew_mib = attacked(server.pid, argv, attacker, 60)
            print(f"the pairing process grew {grew_mib:.1f} MiB; {out.strip()}")
            assert attack.returncode == 0, err
            guesses = json.loads(out.splitlines()[-1])
            assert guesses[:3] == ["wrong pairing code"] * 3, guesses
            assert all("it is ignored now" in g for g in guesses[3:]), guesses
            assert grew_mib < 64, f"the pairing process grew by {grew_mib:.0f} MiB"
            paired = rbee_on(h2, keeper, "pair", f"{h1.address}:7830", code)
            assert paired.returncode == 0, paired.stderr
            assert "paired with alpha" in paired.stdout + paired.stderr
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate(timeout=30)
