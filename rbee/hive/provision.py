"""Getting a worker for a request: resolve the model (downloading a Hub model first), then
reuse, wait for, spawn or queue on a worker, by the registry's pure plan."""

from __future__ import annotations

from pathlib import Path

import psutil

from rbee import log
from rbee.catalog import ModelEntry
from rbee.errors import AllSlotsBusy, HiveDraining, InsufficientRam, InvalidRequest, RbeeError
from rbee.hive.pulls import Finished
from rbee.hive.registry import WorkerRecord, plan_worker
from rbee.hive.settings import RETRY_AFTER_S, HiveState
from rbee.hub.refs import is_hub_reference, parse_reference
from rbee.protocol.messages import (
    EnsureWorker,
    ModelPulled,
    Progress,
    PullModel,
    WorkerAssigned,
)

DEFAULT_CTX_TOKENS = 4096
MEMORY_MARGIN_BYTES = 256 * 1024 * 1024

logger = log.get(__name__)


class NeedsPull(Exception):
    """A Hub reference that is not in the catalog yet (raised by ``Hive._resolve``)."""

    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference


def _pulled(entry: ModelEntry, downloaded: bool) -> ModelPulled:
    return ModelPulled(
        name=entry.name,
        reference=entry.reference,
        path=entry.path,
        size_bytes=entry.size_bytes,
        sha256=entry.sha256,
        downloaded=downloaded,
    )


class Provisioner(HiveState):
    """The hive's model and worker provisioning (a part of ``Hive``)."""

    def _resolve(self, reference: str) -> ModelEntry:
        if self.draining:
            raise HiveDraining(f"hive {self.node} is shutting down", retry_after_s=RETRY_AFTER_S)
        if is_hub_reference(reference):
            canonical = parse_reference(reference).canonical()
            entry = self.catalog.find_reference(canonical)
            if entry is None or not Path(entry.path).is_file():
                raise NeedsPull(canonical)
        else:
            entry = self.catalog.resolve(reference, allow_files=self.config.loopback_only)
        if self.catalog.get(entry.name) is not None:  # file: and synthetic: models have no row
            self.catalog.touch(entry.name)
        return entry

    def on_ensure_worker(self, who: bytes, rid: int, frame: EnsureWorker) -> None:
        """Reuse an idle worker holding the model, join one loading it, spawn one, or name a
        busy one (the job will queue); a Hub model not here yet is downloaded first."""
        try:
            entry = self._resolve(frame.model)
        except NeedsPull as need:
            self._require_admin(f"downloading {need.reference}")
            self.pulls.join(need.reference, who, rid, "ensure", frame.n_ctx)
            self.front.send(who, Progress(phase="download", message=need.reference), rid)
            return
        self._ensure(who, rid, entry, frame.n_ctx)

    def _ensure(self, who: bytes, rid: int, entry: ModelEntry, n_ctx: int) -> None:
        plan = plan_worker(self.pool.records(), entry.path, self.config.limits, self._fits(entry))
        if plan.action in ("reuse", "queue"):
            assert plan.worker is not None
            assigned = WorkerAssigned(
                worker_id=plan.worker.worker_id,
                model=plan.worker.model,
                reused=True,
                load_s=0,
                busy=plan.action == "queue",
            )
            self.front.send(who, assigned, rid)
            return
        if plan.action == "busy":
            self._refuse_busy(entry)
        if plan.action == "spawn":
            if plan.evict is not None:
                self.pool.stop(plan.evict, f"making room for {entry.name}")
            worker = self._spawn(entry, n_ctx)
            message = f"spawned worker {worker.worker_id} (pid {worker.pid}) for {entry.name}"
        else:
            assert plan.worker is not None
            worker = plan.worker
            message = f"waiting for worker {worker.worker_id}, already loading {entry.name}"
        worker.waiters.append((who, rid))
        self.front.send(who, Progress(phase="spawn", message=message), rid)

    def on_pull_model(self, who: bytes, rid: int, frame: PullModel) -> None:
        """Download a Hub model into the catalog (at once if it is already here)."""
        if not is_hub_reference(frame.reference):
            raise InvalidRequest(
                f"{frame.reference!r} is not a Hugging Face reference",
                suggestion="use hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf",
            )
        try:
            entry = self._resolve(frame.reference)
        except NeedsPull as need:
            self.pulls.join(need.reference, who, rid, "pull")
            self.front.send(who, Progress(phase="download", message=need.reference), rid)
            return
        self.front.send(who, _pulled(entry, downloaded=False), rid)

    def _on_pull_finished(self, done: Finished) -> None:
        if done.error is not None:
            for who, rid, _, _ in done.pull.waiters:
                self.front.reply_error(who, rid, done.error)
            return
        total = sum(f.size for f in done.files)
        finished = Progress(phase="download", done=total, total=total, message="verified")
        for who, rid, _, _ in done.pull.waiters:
            self.front.send(who, finished, rid)
        first = done.files[0]
        known = self.catalog.find_path(first.path)
        if known is not None:  # another spelling of a model already here
            for who, rid, purpose, n_ctx in done.pull.waiters:
                self._after_pull(who, rid, purpose, n_ctx, known, downloaded=False)
            return
        entry = self.catalog.add_pulled(
            first.path,
            reference=first.reference,
            repo=first.repo,
            file=first.filename,
            revision=first.commit,
            sha256=first.sha256,
            size_bytes=total,
        )
        logger.info("pulled", model=entry.name, reference=entry.reference, bytes=entry.size_bytes)
        for who, rid, purpose, n_ctx in done.pull.waiters:
            self._after_pull(who, rid, purpose, n_ctx, entry, downloaded=True)

    def _after_pull(
        self, who: bytes, rid: int, purpose: str, n_ctx: int, entry: ModelEntry, downloaded: bool
    ) -> None:
        if purpose == "pull":
            self.front.send(who, _pulled(entry, downloaded=downloaded), rid)
            return
        try:
            self._ensure(who, rid, entry, n_ctx)
        except RbeeError as exc:
            self.front.reply_error(who, rid, exc)

    def _fits(self, entry: ModelEntry) -> bool:
        """Whether one more worker of this model fits in free RAM (weights + margin)."""
        return entry.size_bytes + MEMORY_MARGIN_BYTES <= psutil.virtual_memory().available

    def _refuse_busy(self, entry: ModelEntry) -> None:
        if not self._fits(entry) and not any(
            w.model_path == entry.path for w in self.pool.records()
        ):
            free = psutil.virtual_memory().available
            raise InsufficientRam(
                f"{entry.name} needs about {(entry.size_bytes + MEMORY_MARGIN_BYTES) >> 20} MiB "
                f"of RAM; {free >> 20} MiB are free on {self.node}",
                suggestion="stop other workers (`rbee ps`) or use a smaller quantization",
            )
        raise AllSlotsBusy(
            f"all {self.config.limits.max_workers} workers of {self.node} are busy",
            retry_after_s=RETRY_AFTER_S,
            suggestion="try again shortly",
        )

    def _spawn(self, entry: ModelEntry, n_ctx: int) -> WorkerRecord:
        ctx = n_ctx or min(entry.context_length or DEFAULT_CTX_TOKENS, DEFAULT_CTX_TOKENS)
        worker = self.pool.spawn(entry.name, entry.path, ctx)
        worker.keep_alive_s = self.config.keep_alive_s
        return worker
