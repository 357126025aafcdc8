"""Getting a worker for a request: resolve the model (downloading a Hub model first), then
reuse, wait for, spawn or queue on a worker, by the registry's pure plan."""

from __future__ import annotations

from pathlib import Path

from rbee import gpu, log
from rbee.catalog import ModelEntry
from rbee.errors import AllSlotsBusy, HiveDraining, InvalidRequest, RbeeError
from rbee.hive import placement
from rbee.hive.placement import MemoryEstimate, Placement
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
        busy one (the job will queue); a Hub model not here yet is downloaded first. A backend
        or device this hive lacks is refused before anything is downloaded."""
        self._place(frame.backend, frame.device)
        try:
            entry = self._resolve(frame.model)
        except NeedsPull as need:
            self._require_admin(f"downloading {need.reference}")
            self.pulls.join(need.reference, who, rid, "ensure", frame.n_ctx)
            self.wants[(who, rid)] = (frame.backend, frame.device)
            self.front.send(who, Progress(phase="download", message=need.reference), rid)
            return
        self._ensure(who, rid, entry, frame.n_ctx, frame.backend, frame.device)

    def preload(self, reference: str) -> None:
        """Start loading a CPU worker for a model nobody asked for yet: an ephemeral hive does
        this for the model its keeper is about to ask for, so the load overlaps the keeper's
        LAN survey. A model that needs a download or does not fit waits for the request,
        which says why."""
        try:
            entry = self._resolve(reference)
            where = self._place("cpu", "")
            needed = placement.estimate_for_file(entry.path, self._context(entry, 0), "cpu")
            plan = plan_worker(
                self.pool.records(),
                entry.path,
                self.config.limits,
                needed.total_bytes <= where.free_bytes,
                serves=lambda w: w.backend == "cpu",
            )
            if plan.action != "spawn" or plan.evict is not None:
                return
            worker = self._spawn(entry, 0, where, needed)
            logger.info("preloading", model=entry.name, worker=worker.worker_id)
        except (NeedsPull, RbeeError) as exc:
            logger.info("not preloaded", model=reference, reason=str(exc))

    def _place(self, backend: str, device: str) -> Placement:
        """The device for a request now, or BACKEND_UNAVAILABLE; the CPU skips GPU detection."""
        if backend == "cpu" and not device:
            return placement.choose_device(gpu.Inventory(cpu=gpu.cpu_info()), "cpu")
        return placement.choose_device(gpu.detect(), backend, device, self.node)

    def _ensure(
        self,
        who: bytes,
        rid: int,
        entry: ModelEntry,
        n_ctx: int,
        backend: str = "cpu",
        device: str = "",
    ) -> None:
        where = self._place(backend, device)
        needed = placement.estimate_for_file(entry.path, self._context(entry, n_ctx), backend)
        plan = plan_worker(
            self.pool.records(),
            entry.path,
            self.config.limits,
            needed.total_bytes <= where.free_bytes,
            serves=lambda w: placement.serves(w.backend, w.device, where, device),
        )
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
            self._refuse_busy(entry, where, needed)
        if plan.action == "spawn":
            if plan.evict is not None:
                self.pool.stop(plan.evict, f"making room for {entry.name}")
            worker = self._spawn(entry, n_ctx, where, needed)
            message = (
                f"spawned worker {worker.worker_id} (pid {worker.pid}) for {entry.name} on "
                f"{where.label}; it needs about {needed.describe()}"
            )
        else:
            assert plan.worker is not None
            worker = plan.worker
            message = (
                f"waiting for worker {worker.worker_id} (pid {worker.pid}), already loading "
                f"{entry.name}"
            )
        worker.waiters.append((who, rid))
        self.front.send(who, Progress(phase="spawn", message=message), rid)
        if plan.action != "spawn" and worker.loaded_fraction > 0:  # how far it got without us
            self.front.send(
                who, Progress(phase="loading", done=worker.loaded_fraction, total=1.0), rid
            )

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
        backend, device = self.wants.pop((who, rid), ("cpu", ""))
        try:
            self._ensure(who, rid, entry, n_ctx, backend, device)
        except RbeeError as exc:
            self.front.reply_error(who, rid, exc)

    def _refuse_busy(self, entry: ModelEntry, where: Placement, needed: MemoryEstimate) -> None:
        """INSUFFICIENT_VRAM/RAM when the model does not fit and no worker of it runs there;
        else every slot is busy."""
        if not any(
            w.model_path == entry.path and placement.serves(w.backend, w.device, where, "")
            for w in self.pool.records()
        ):
            placement.check_fits(needed, where, entry.name, self.node)
        raise AllSlotsBusy(
            f"all {self.config.limits.max_workers} workers of {self.node} are busy",
            retry_after_s=RETRY_AFTER_S,
            suggestion="try again shortly",
        )

    def _context(self, entry: ModelEntry, n_ctx: int) -> int:
        """The context a worker loads with: as asked, else the model's own up to 4096 tokens."""
        return n_ctx or min(entry.context_length or DEFAULT_CTX_TOKENS, DEFAULT_CTX_TOKENS)

    def _spawn(
        self,
        entry: ModelEntry,
        n_ctx: int,
        where: Placement | None = None,
        needed: MemoryEstimate | None = None,
    ) -> WorkerRecord:
        worker = self.pool.spawn(entry.name, entry.path, self._context(entry, n_ctx), where)
        worker.keep_alive_s = self.config.keep_alive_s
        worker.estimate_bytes = needed.total_bytes if needed is not None else 0
        return worker
