"""The `rbee` command: one parser, and each mode picked once, here.

``main(argv) -> int`` parses, configures logging for the chosen mode, runs exactly one component
and turns an RbeeError into a message on stderr and its documented exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

from rbee import __version__, config
from rbee.config import (
    COUNT_FLAG,
    INTERVAL_FLAG,
    PORT_FLAG,
    POSITIVE_FLAG,
    SIZE_FLAG,
    SLOTS_FLAG,
)
from rbee.errors import Canceled, ExitCode, InvalidRequest, OutputFailed, RbeeError
from rbee.paths import data_dir, hive_port, stream_port
from rbee.protocol.messages import (
    DEFAULT_MODEL,
    FILE_PREFIX,
    HIVE_KEEP_ALIVE_S,
    KEEP_ALIVE_DEFAULT,
    MAX_CTX_TOKENS,
    PAIR_WINDOW_S,
    PLACEMENTS,
    PROTOCOL_VERSION,
    STREAM_INTERVAL_MS,
)
from rbee.protocol.schema import not_unicode
from rbee.terminal import safe
from rbee.transport.keys import ROLES, check_key
from rbee.worker.args import WorkerArgs
from rbee.worker.args import add_flags as add_worker_flags
from rbee.worker.lender import add_flags as add_lender_flags


def version_text() -> str:
    """rbee's version, the protocol version and the llama.cpp build in use: its CPU variant
    and features here, and the threads a worker would use."""
    try:
        from rbee import llamacpp

        engine = f"llama-cpp-python {llamacpp.import_llama().__version__}"
        variant = llamacpp.loaded_variant()
        engine += f"\nCPU {'variant ' + variant if variant else 'backend'}: "
        engine += f"{llamacpp.cpu_features() or 'no SIMD features'}"
        engine += f"; {llamacpp.default_threads()} threads by default"
    except Exception as exc:  # the keeper works without llama.cpp; say what is missing
        engine = f"llama.cpp unavailable ({type(exc).__name__}: {exc})"
    return f"rbee {__version__}\nprotocol {PROTOCOL_VERSION}\n{engine}"


SECURITY = "rbee.keeper.security"
EXPLAIN = "rbee.keeper.explain"
MODELS = "rbee.keeper.models"
NODES = "rbee.keeper.nodes"
TOP = "rbee.keeper.top"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each verb's parser binds the function that runs it (``run``)."""
    parser = argparse.ArgumentParser(
        prog="rbee", description="Run GGUF language models on the machines you already own."
    )
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log detail for this command and the processes it starts (also RBEE_LOG_LEVEL)",
    )
    parser.set_defaults(run=None)
    sub = parser.add_subparsers(metavar="COMMAND")

    infer = sub.add_parser("infer", help="generate text, streamed to stdout")
    infer.set_defaults(run=_infer)
    infer.add_argument(
        "prompt_arg", nargs="?", metavar="PROMPT", help="the prompt; '-' reads stdin"
    )
    infer.add_argument("-p", "--prompt", help="the prompt (instead of the positional argument)")
    infer.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help=f"catalog name, hf:ORG/REPO[:QUANT] or file:PATH (default: {DEFAULT_MODEL})",
    )
    infer.add_argument("-n", "--max-tokens", type=int, default=256, help="default: 256")
    infer.add_argument(
        "-t", "--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)"
    )
    infer.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    infer.add_argument("--top-k", type=int, default=40, help="default: 40")
    infer.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (default)")
    infer.add_argument(
        "--ctx",
        type=int,
        default=0,
        metavar="N",
        help="tokens of context the worker holds for the job; a worker with less is not used "
        "(default 0: the model's own, at most 4096; more than the model's is cut to it)",
    )
    infer.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop before this text (repeatable)",
    )
    infer.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as is, without the model's chat template",
    )
    infer.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past end-of-sequence (benchmarks)",
    )
    infer.add_argument(
        "--receipt",
        action="store_true",
        help="after the answer, say what served it: node, worker, device, model sha256 and "
        "revision, llama.cpp build, sampling, queue time, first token, tokens/s",
    )
    structured = infer.add_mutually_exclusive_group()
    structured.add_argument(
        "--format",
        choices=["json"],
        help="json: the output is one JSON object (a grammar holds the model to it)",
    )
    structured.add_argument(
        "--json-schema",
        metavar="FILE",
        help="the output is a JSON document that validates against the JSON schema in FILE",
    )
    infer.add_argument(
        "--node",
        help="HOST[:PORT] or node name of the hive to use (default: the best one in reach)",
    )
    infer.add_argument(
        "--backend",
        choices=PLACEMENTS,
        default="auto",
        help="auto: the hive places the model (one GPU, several, part GPU and part CPU, or the "
        "CPU; `rbee explain` shows why); cpu; or cuda: every layer on one GPU, never a silent "
        "CPU run (default: auto)",
    )
    infer.add_argument(
        "--device",
        default="",
        metavar="N|UUID",
        help="the GPU for --backend cuda: index or UUID (default: the one with most free memory)",
    )
    infer.add_argument(
        "--keep-alive",
        type=parse_duration,
        default=KEEP_ALIVE_DEFAULT,
        metavar="DURATION",
        help="keep the worker loaded this long after the job (e.g. 30s, 5m, 1h; 0 unloads at "
        "once, -1 keeps it loaded; default: the hive's, 5m)",
    )

    hive = sub.add_parser("hive", help="run this machine's hive daemon")
    hive.set_defaults(run=_hive)
    env = os.environ.get
    hive.add_argument(
        "--host",
        default=env("RBEE_HIVE_HOST", "127.0.0.1"),
        help="address to listen on (default: 127.0.0.1, loopback only)",
    )
    hive.add_argument("--port", type=PORT_FLAG, default=hive_port(), help="request port (ROUTER)")
    hive.add_argument(
        "--stream-port", type=PORT_FLAG, default=stream_port(), help="token stream port (XPUB)"
    )
    hive.add_argument(
        "--node-name", default=env("RBEE_NODE_NAME", ""), help="name shown to keepers (hostname)"
    )
    hive.add_argument(
        "--max-workers",
        type=POSITIVE_FLAG,
        default=int(env("RBEE_MAX_WORKERS", "4")),
        help="(default 4)",
    )
    hive.add_argument(
        "--max-workers-per-model",
        type=POSITIVE_FLAG,
        default=1,
        help="workers of one model (default 1)",
    )
    hive.add_argument(
        "--max-queue",
        type=POSITIVE_FLAG,
        default=int(env("RBEE_MAX_QUEUE", "16")),
        help="(default 16)",
    )
    hive.add_argument(
        "--keep-alive",
        type=parse_duration,
        default=HIVE_KEEP_ALIVE_S,
        metavar="DURATION",
        help="how long an idle worker stays loaded (default 5m; -1: forever)",
    )
    hive.add_argument(
        "--threads",
        type=COUNT_FLAG,
        default=int(env("RBEE_THREADS", "0")),
        help="CPU threads per worker (default 0: the physical cores this hive may use)",
    )
    hive.add_argument(
        "--parallel",
        type=SLOTS_FLAG,
        default=int(env("RBEE_PARALLEL", "0")),
        metavar="N",
        help="jobs each worker decodes together, each with its own context (default 0: "
        "automatic, 4 or as many as fit in free memory)",
    )
    hive.add_argument(
        "--stream-interval-ms",
        type=INTERVAL_FLAG,
        default=int(env("RBEE_STREAM_INTERVAL_MS", str(STREAM_INTERVAL_MS))),
        metavar="MS",
        help=f"tokens that come closer together than this reach clients in one frame, saving "
        f"a wake-up of every process on the way per token (default {STREAM_INTERVAL_MS}; 0: "
        "one frame per token)",
    )
    hive.add_argument(
        "--backend",
        choices=PLACEMENTS,
        default=env("RBEE_BACKEND", "auto"),
        help="where requests that name no backend run (default auto: one GPU, several, part GPU "
        "and part CPU, or the CPU, as the model fits; cpu or cuda pins them)",
    )
    hive.add_argument(
        "--secure",
        action="store_true",
        default=bool(env("RBEE_SECURE")),
        help="use CURVE keys even on loopback (always on when listening on any other address)",
    )
    hive.add_argument(
        "--lend",
        action=argparse.BooleanOptionalAction,
        default=env("RBEE_LEND", "true").strip().lower() not in config.ENV_FALSE,
        help="lend this machine's memory to models that peer hives hold, over their CURVE "
        "link, to keys with the hive or admin role (default on)",
    )
    hive.add_argument(
        "--memory-limit",
        type=SIZE_FLAG,
        default=env("RBEE_MEMORY_LIMIT", "0"),
        metavar="SIZE",
        help="the most RAM this hive plans with, its workers' and lenders' included, e.g. 8G "
        "(default 0: what the machine has)",
    )
    hive.add_argument(
        "--lender-stall",
        type=POSITIVE_FLAG,
        default=int(env("RBEE_LENDER_STALL_S", "10")),
        metavar="SECONDS",
        help="a lender that sends nothing and uses no CPU time this long while a job runs on "
        "memory it lends is lost: the job ends with LENDER_LOST (default 10)",
    )
    hive.add_argument(
        "--share-rate",
        type=SIZE_FLAG,
        default=env("RBEE_SHARE_RATE", "0"),
        metavar="SIZE",
        help="the most bytes per second this hive sends model files to peer hives (keys with "
        "the hive or admin role), e.g. 50M (default 0: no limit)",
    )
    hive.add_argument(
        "--metrics-port",
        default="0",
        metavar="[127.0.0.1:]PORT",
        help="also serve Prometheus /metrics over HTTP on this loopback port, for an agent on "
        "this machine (default 0: off; keepers and `rbee serve` ask over the hive's port)",
    )
    hive.add_argument("--ephemeral", action="store_true", help=argparse.SUPPRESS)
    hive.add_argument("--preload", default="", help=argparse.SUPPRESS)
    hive_actions = hive.add_subparsers(
        dest="hive_command", metavar="[ACTION]", title="actions (none: run the daemon)"
    )
    hinst = hive_actions.add_parser("install", help="install this binary as a systemd service")
    hinst.set_defaults(run=_install)
    hinst.add_argument(
        "--user", action="store_true", help="a user service (~/.local, systemctl --user)"
    )
    hinst.add_argument("--binary", type=Path, help="the rbee binary to install (default: this one)")
    hinst.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    hun = hive_actions.add_parser("uninstall", help="remove the service and the binary")
    hun.set_defaults(run=_uninstall)
    hun.add_argument("--user", action="store_true", help="the user service")
    hun.add_argument(
        "--remove-models", action="store_true", help="also delete the models and catalog"
    )
    hun.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    hpair = hive_actions.add_parser(
        "pair", help="print a one-time code and wait for a keeper to pair (rbee pair NODE CODE)"
    )
    hpair.set_defaults(run=_lazily(SECURITY, "hive_pair"))
    hpair.add_argument(
        "--role",
        choices=ROLES,
        default="infer",
        help="what the paired keeper may do (default: infer; hive: a peer hive that may also "
        "borrow this hive's memory; admin: everything)",
    )
    hpair.add_argument(
        "--timeout",
        type=parse_duration,
        default=PAIR_WINDOW_S,
        metavar="DURATION",
        help="how long the code is valid (default 5m)",
    )
    hpair.add_argument(
        "--port", type=PORT_FLAG, default=hive_port(), help="the hive's port (pairing uses it + 2)"
    )
    hpair.add_argument("--host", default="0.0.0.0", help="address to listen on for pairing")
    hpair.add_argument("--node-name", default="", help="the hive's name (default: hostname)")
    hauth = hive_actions.add_parser("authorize", help="admit a keeper's public key")
    hauth.set_defaults(run=_lazily(SECURITY, "hive_authorize"))
    hauth.add_argument("key", help="the keeper's public key (`rbee keys show` there)")
    hauth.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="infer: run models; hive: a peer hive (also borrow memory); admin: everything",
    )
    hauth.add_argument("--comment", default="", help="a note kept with the key")
    hrev = hive_actions.add_parser("revoke", help="stop admitting a key (by key or fingerprint)")
    hrev.set_defaults(run=_lazily(SECURITY, "hive_revoke"))
    hrev.add_argument("key")
    hkeys = hive_actions.add_parser("keys", help="list the keys this hive admits")
    hkeys.set_defaults(run=_lazily(SECURITY, "hive_keys"))

    pair = sub.add_parser("pair", help="pair with a hive using the code `rbee hive pair` printed")
    pair.set_defaults(run=_lazily(SECURITY, "pair"))
    pair.add_argument("node", help="a discovered node name or HOST[:PORT] of the hive")
    pair.add_argument("code", help="the one-time code, e.g. 1234-5678")

    keys = sub.add_parser("keys", help="this node's CURVE key and the hives it trusts")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kshow = ksub.add_parser("show", help="print this node's public key and fingerprint")
    kshow.set_defaults(run=_lazily(SECURITY, "keys_show"))
    kknown = ksub.add_parser("known", help="list the hives this keeper trusts")
    kknown.set_defaults(run=_lazily(SECURITY, "keys_known"))
    kforget = ksub.add_parser("forget", help="forget a hive's pinned key (name, id or address)")
    kforget.set_defaults(run=_lazily(SECURITY, "keys_forget"))
    kforget.add_argument("node")

    serve = sub.add_parser("serve", help="serve the OpenAI API for every hive in reach")
    serve.set_defaults(run=_serve)
    serve.add_argument(
        "--listen",
        default="127.0.0.1:7833",
        metavar="HOST[:PORT]",
        help="address to listen on (default: 127.0.0.1:7833; any other needs API keys)",
    )
    serve.add_argument(
        "--node",
        help="HOST[:PORT] or node name: send every request there "
        "(default: chosen per request, as `rbee infer` does)",
    )
    serve.add_argument(
        "--api-keys-file",
        metavar="PATH",
        help="Bearer keys, one a line, mode 600 (also: RBEE_API_KEYS)",
    )
    serve.add_argument(
        "--ready-timeout",
        type=parse_duration,
        default=600.0,
        metavar="DURATION",
        help="longest wait for a worker: download, load, queue (default 10m)",
    )
    serve.add_argument(
        "--keep-alive",
        type=parse_duration,
        default=KEEP_ALIVE_DEFAULT,
        metavar="DURATION",
        help="keep workers loaded this long after a job (default: the hive's)",
    )
    serve.add_argument(
        "--backend",
        choices=PLACEMENTS,
        default="auto",
        help="where workers for its requests run, as `rbee infer --backend` (default: auto)",
    )
    serve.add_argument("--device", default="", metavar="N|UUID", help="the GPU for --backend cuda")
    serve.add_argument(
        "--ollama-listen",
        default="",
        metavar="HOST[:PORT]",
        help="also listen here, where tools made for Ollama look (e.g. 127.0.0.1, port 11434)",
    )

    worker = sub.add_parser("worker", help="(started by a hive) serve one model")
    worker.set_defaults(run=_worker)
    add_worker_flags(worker)

    lender = sub.add_parser("lender", help="(started by a hive) lend memory to another's model")
    lender.set_defaults(run=_lender)
    add_lender_flags(lender)

    models = sub.add_parser("models", help="this machine's model catalog")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    imp = msub.add_parser("import", help="register a local GGUF file")
    imp.set_defaults(run=_keeper(MODELS, "import_model", "path", "name"))
    imp.add_argument("path")
    imp.add_argument("--name", help="catalog name (default: the file name)")
    pull = msub.add_parser("pull", help="download a model from Hugging Face into a hive")
    pull.set_defaults(run=_keeper(MODELS, "pull_model", "reference", "node", "hub", "peers"))
    pull.add_argument("reference", help="hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]")
    pull.add_argument("--node", help="HOST[:PORT] or node name (default: chosen as for infer)")
    pull.add_argument(
        "--no-hub",
        dest="hub",
        action="store_false",
        help="take the bytes from peer hives only (they say which revision the reference means)",
    )
    pull.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="take the bytes from the Hub only (by default hives paired as hives are asked first)",
    )
    mlist = msub.add_parser("list", help="list the catalog")
    mlist.set_defaults(run=_keeper(MODELS, "list_models", "json"))
    mlist.add_argument("--json", action="store_true", help="machine-readable output")
    mshow = msub.add_parser(
        "show", help="one model's details: file, source, shape, GGUF metadata, chat template"
    )
    mshow.set_defaults(run=_keeper(MODELS, "show_model", "name", "json"))
    mshow.add_argument("name", help="catalog name (`rbee models list`)")
    mshow.add_argument("--json", action="store_true", help="machine-readable output")
    rm = msub.add_parser(
        "rm", help="forget a model (an imported file is kept; a pulled download is deleted)"
    )
    rm.set_defaults(run=_keeper(MODELS, "remove_model", "name", "force"))
    rm.add_argument("name")
    rm.add_argument(
        "--force", action="store_true", help="also stop this machine's workers that hold it"
    )

    logs = sub.add_parser("logs", help="a hive's or a worker's recent log lines")
    logs.set_defaults(run=_keeper(NODES, "show_logs", "target", "follow"))
    logs.add_argument("target", nargs="?", help="node name, HOST[:PORT] or worker id (w-…)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")

    cfg = sub.add_parser("config", help="configuration: file, environment and flags")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cshow = cfg_sub.add_parser(
        "show", help="every setting's effective value and where it came from"
    )
    cshow.set_defaults(run=_config_show)

    explain = sub.add_parser(
        "explain", help="where a request for a model would run and why (needed against free)"
    )
    explain.set_defaults(run=_keeper(EXPLAIN, "explain", "model", "node", "backend", "device"))
    explain.add_argument("model", help="catalog name or hf: reference")
    explain.add_argument("--node", help="HOST[:PORT] or node name: only this hive")
    explain.add_argument("--backend", choices=PLACEMENTS, default="auto", help="as for infer")
    explain.add_argument("--device", default="", metavar="N|UUID", help="as for infer")
    ps = sub.add_parser("ps", help="list the workers of every hive in reach")
    ps.set_defaults(run=_keeper(NODES, "list_workers", "node", "json"))
    ps.add_argument("--node", help="HOST[:PORT] or node name: only this hive")
    ps.add_argument("--json", action="store_true", help="machine-readable output")

    nodes = sub.add_parser("nodes", help="list the hives in reach (mDNS, RBEE_SEEDS, this machine)")
    nodes.set_defaults(run=_keeper(NODES, "list_nodes", "json", "timeout"))
    nodes.add_argument("--json", action="store_true", help="machine-readable output")
    nodes.add_argument(
        "--timeout",
        type=float,
        default=1.5,
        metavar="SECONDS",
        help="longest wait for answers when none come (default 1.5; returns once they settle)",
    )

    top = sub.add_parser("top", help="a live view of every hive in reach (q quits, s sorts)")
    top.set_defaults(run=_keeper(TOP, "top", "interval", "once"))
    top.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="refresh (default 2)"
    )
    top.add_argument("--once", action="store_true", help="print one plain snapshot and exit")

    workers = sub.add_parser("workers", help="manage a hive's workers")
    wsub = workers.add_subparsers(dest="workers_command", metavar="ACTION", required=True)
    wstop = wsub.add_parser("stop", help="unload a worker (its running job is canceled)")
    wstop.set_defaults(run=_keeper(NODES, "stop_worker", "worker_id", "node"))
    wstop.add_argument("worker_id")
    wstop.add_argument("--node", help="HOST[:PORT] or node name (default: the hive that runs it)")
    return parser


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h``, plain seconds, ``0`` or ``-1`` (forever) → seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    value = text.strip().lower()
    scale = units.get(value[-1:], 0.0)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (try 30s, 5m, 1h, -1)"
        ) from None
    if seconds < 0 and seconds != -1:
        raise argparse.ArgumentTypeError(f"a duration is ≥ 0, or -1 for forever (got {text!r})")
    return seconds


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_arg is not None:
        raise InvalidRequest("give the prompt once: either PROMPT or --prompt")
    prompt = args.prompt if args.prompt is not None else args.prompt_arg
    if prompt == "-":
        prompt = _read_stdin()
    if not prompt:
        raise InvalidRequest(
            "no prompt given", suggestion='rbee infer "Why is the sky blue?" (or - for stdin)'
        )
    return str(prompt)


def _read_stdin() -> str:
    """All of stdin as UTF-8, strictly: Python's own reading would keep bytes that are not UTF-8
    as surrogates in the C locale (and fail later, deep in an encode)."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"stdin is not UTF-8 text (the byte 0x{data[exc.start]:02x} at offset {exc.start})",
            suggestion="convert it first, e.g. `iconv -f latin1 -t utf-8 FILE | rbee infer -`",
        ) from None


NOT_EMPTY = ("--node", "--name", "-m", "--model", "--node-name", "--host")


KEY_VERBS = ("authorize", "revoke")  # `rbee hive authorize KEY`, `rbee hive revoke KEY`


def keys_last(argv: Sequence[str]) -> list[str]:
    """``argv`` with a public key that begins with "-" moved behind "--", after `hive authorize`
    or `hive revoke`: z85 has "-" among its characters (about one key in 85 starts with it), and
    argparse would take such a key for an unknown option ("the following arguments are
    required: key")."""
    args = list(argv)
    for i in range(len(args) - 1):
        if args[i] == "hive" and args[i + 1] in KEY_VERBS:
            rest = args[i + 2 :]
            keys = [a for a in rest if a.startswith("-") and _is_key(a)]
            if not keys or "--" in rest:
                return args
            return [*args[: i + 2], *(a for a in rest if a not in keys), "--", *keys]
    return args


def _is_key(text: str) -> bool:
    try:
        check_key(text)
    except InvalidRequest:
        return False
    return True


def _check_not_empty(argv: Sequence[str]) -> None:
    """Refuse ``--node ""`` and the like: an empty value would silently mean the default."""
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        given_empty = (eq and not value) or (not eq and i + 1 < len(argv) and argv[i + 1] == "")
        if flag in NOT_EMPTY and given_empty:
            raise InvalidRequest(
                f"{flag} is empty", suggestion=f"give {flag} a value, or leave it out"
            )


def _check_text_args(args: argparse.Namespace) -> None:
    """Refuse arguments that are not UTF-8 (Python keeps their bytes as surrogates) before any
    of them reaches a catalog query or a frame."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and (problem := not_unicode(text)):
                flag = "PROMPT" if name == "prompt_arg" else "--" + name.replace("_", "-")
                raise InvalidRequest(
                    f"{flag} {problem}",
                    suggestion="give it as UTF-8 (check the terminal's encoding)",
                )


def _model_ref(model: str) -> str:
    if model.startswith(FILE_PREFIX):
        return FILE_PREFIX + str(Path(model.removeprefix(FILE_PREFIX)).expanduser().resolve())
    return model


Verb = Callable[[argparse.Namespace], int]


def _lazily(module: str, name: str) -> Verb:
    """A verb's function from ``module``, imported when the verb runs: parsing the command line
    (and `rbee --help`) loads neither ZeroMQ nor llama.cpp."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))

    return run


def _keeper_logging() -> None:
    """A keeper verb's logs: warnings and worse, as text (its output is the point)."""
    from rbee import log

    log.configure("keeper", json=False, level="warning")


def _keeper(module: str, name: str, *fields: str) -> Verb:
    """A keeper verb that is one call: ``module.name(args.FIELD, …)``, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        _keeper_logging()
        getattr(importlib.import_module(module), name)(*(getattr(args, f) for f in fields))
        return ExitCode.OK

    return run


def _config_show(args: argparse.Namespace) -> int:
    print(config.show(args.config_sources), end="")
    return ExitCode.OK


def _worker(args: argparse.Namespace) -> int:
    if args.probe:
        from rbee.worker.probe import run_probe

        return run_probe(args.model_path, args.threads, args.extra_bufts)
    from rbee.worker.main import run as run_worker

    return run_worker(WorkerArgs.parse(args))


def _lender(args: argparse.Namespace) -> int:
    from rbee.worker.lender import run as run_lender

    return run_lender(args)


def _install(args: argparse.Namespace) -> int:
    from rbee import install

    print(install.install(args.binary or install.default_binary(), args.user, args.root).text())
    return ExitCode.OK


def _uninstall(args: argparse.Namespace) -> int:
    from rbee import install

    print(install.uninstall(args.user, args.remove_models, args.root).text())
    return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    from rbee import log
    from rbee.gateway.main import prepare
    from rbee.gateway.main import run as run_gateway

    log.configure("gateway")
    server = prepare(
        args.listen,
        node=args.node,
        api_keys_file=args.api_keys_file,
        ready_timeout_s=args.ready_timeout,
        worker_keep_alive_s=args.keep_alive,
        backend=args.backend,
        device=args.device,
        ollama_listen=args.ollama_listen,
    )
    return run_gateway(server)


def _hive(args: argparse.Namespace) -> int:
    from rbee.hive.main import run as run_hive
    from rbee.hive.metrics import metrics_address
    from rbee.hive.registry import Limits
    from rbee.hive.settings import HiveConfig

    metrics_host, metrics_port = metrics_address(args.metrics_port)
    limits = Limits(
        max_workers=args.max_workers,
        max_workers_per_model=args.max_workers_per_model,
        max_queue=args.max_queue,
    )
    config = HiveConfig(
        host=args.host,
        port=args.port,
        stream_port=args.stream_port,
        data_dir=data_dir(),
        node=args.node_name,
        ephemeral=args.ephemeral,
        preload=args.preload,
        limits=limits,
        keep_alive_s=args.keep_alive,
        secure=args.secure,
        lend=args.lend,
        memory_limit=args.memory_limit,
        lender_stall_s=float(args.lender_stall),
        share_rate=args.share_rate,
        threads=max(0, args.threads),
        parallel=args.parallel,
        backend=args.backend,
        stream_interval_ms=args.stream_interval_ms,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
    )
    return run_hive(config)


def _infer(args: argparse.Namespace) -> int:
    from rbee.keeper.infer import InferRequest, output_grammar
    from rbee.keeper.infer import run as run_infer
    from rbee.protocol.messages import GenerateParams

    _keeper_logging()
    if not 0 <= args.ctx <= MAX_CTX_TOKENS:
        raise InvalidRequest(f"--ctx must be between 0 and {MAX_CTX_TOKENS} (got {args.ctx})")
    params = GenerateParams(
        prompt=_prompt(args),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        raw=args.raw,
        ignore_eos=args.ignore_eos,
        grammar=output_grammar(args.format, args.json_schema),
    )
    request = InferRequest(
        model=_model_ref(args.model),
        params=params,
        node=args.node,
        keep_alive_s=args.keep_alive,
        backend=args.backend,
        device=args.device,
        n_ctx=args.ctx,
    )
    run_infer(request, receipt=args.receipt)
    return ExitCode.OK


class GuardedStdout:
    """stdout whose write failures are OutputFailed: a pipe closed early (``| head``) or a full
    disk then end the command with a coded error (and `rbee infer` cancels its job) instead of
    a traceback."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise output_failed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise output_failed(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def output_failed(exc: OSError) -> OutputFailed:
    """The error for a failed write to stdout."""
    if exc.errno == errno.EPIPE:
        return OutputFailed("stdout was closed before the output ended (a `| head` that quit?)")
    return OutputFailed(
        f"cannot write to stdout: {exc.strerror or exc}",
        suggestion="free space where the output goes, or send it elsewhere",
    )


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ else 1)


def report_error(exc: RbeeError) -> int:
    """Say ``exc`` on stderr as ``error: CODE: message`` and ``hint: …`` (what an ephemeral hive's
    keeper reads back, see keeper.link.coded_exit); returns its exit code. The text may come
    from a hive or a file: escapes are shown, not obeyed."""
    sys.stderr.write(f"error: {safe(exc.code)}: {safe(exc.message)}\n")
    if exc.suggestion:
        sys.stderr.write(f"hint: {safe(exc.suggestion)}\n")
    return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run one mode, and return the process exit code."""
    try:
        sources = config.apply()  # file < environment < flags: flags take defaults from it
        parser = build_parser()
    except RbeeError as exc:
        return report_error(exc)
    parser.set_defaults(config_sources=sources)  # for `rbee config show`
    given = keys_last(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if args.log_level:
        os.environ["RBEE_LOG_LEVEL"] = args.log_level  # children (hive, workers) inherit it
    if args.version:
        print(version_text())
        return ExitCode.OK
    if args.run is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    if isinstance(sys.stdout, io.TextIOWrapper):  # not when a test captures it
        sys.stdout = cast(TextIO, GuardedStdout(sys.stdout))
    try:
        _check_not_empty(given)
        _check_text_args(args)
        run: Verb = args.run
        return run(args)
    except Canceled as exc:
        sys.stderr.write(f"\nCanceled. ({safe(exc.message)})\n")
        return exc.exit_code
    except RbeeError as exc:
        if isinstance(exc, OutputFailed):
            _silence_stdout()
        return report_error(exc)
    except KeyboardInterrupt:
        sys.stderr.write("\nCanceled.\n")
        return ExitCode.CANCELED


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
