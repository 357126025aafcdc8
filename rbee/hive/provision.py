"""Getting a worker for a request: resolve the model (downloading a Hub model first), then
reuse (a free slot), wait for, spawn or queue on a worker, by the registry's pure plan. A new
worker gets the hive's ``--parallel`` slots, or as many of AUTO_SLOTS as fit in free memory. The
provisioner owns the answers to EnsureWorker and PullModel: it tells each waiting request how
its download and its worker's load are going, and what it got."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rbee import gpu, log
from rbee.catalog import Catalog, ModelEntry
from rbee.errors import AllSlotsBusy, HiveDraining, InvalidRequest, ModelNotFound, RbeeError
from rbee.hive import fit, placement
from rbee.hive.ledger import GpuLedger
from rbee.hive.metrics import HiveMetrics
from rbee.hive.placement import Lender, MemoryEstimate, Placement
from rbee.hive.pool import Event, WorkerPool
from rbee.hive.pulls import Finished, Pulls, PullWaiter, describe_progress
from rbee.hive.registry import (
    JobRecord,
    Serves,
    WorkerRecord,
    holds_context,
    pick_free,
    plan_worker,
    waiting_for_slots,
)
from rbee.hive.request import Replies, Request
from rbee.hive.settings import RETRY_AFTER_S, HiveConfig
from rbee.hub.refs import is_hub_reference, parse_reference
from rbee.protocol.messages import (
    DEFAULT_CTX_TOKENS,
    EnsureWorker,
    Explain,
    Explanation,
    Frame,
    ModelPulled,
    PlacementOption,
    Progress,
    PullModel,
    WorkerAssigned,
)

LOAD_PROGRESS_EVERY_S = 1.0  # a keeper waiting for a load hears from the hive at least this often
INVENTORY_TTL_S = 1.0  # how long NVML's picture of the GPUs is used before it is asked again

if TYPE_CHECKING:
    from rbee.hub.transfer import PeerBytes

logger = log.get(__name__)


class NeedsPull(Exception):
    """A Hub reference that is not in the catalog yet (raised by ``Provisioner.resolve``)."""

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


@dataclass(frozen=True)
class Spot:
    """Where a new worker of a model would go and what it would need; ``refusal`` says why it
    does not fit there (INSUFFICIENT_VRAM/RAM), ``serves`` which running workers answer the same
    request, ``plan`` every option automatic placement weighed (`rbee explain`)."""

    placement: Placement | None
    needed: MemoryEstimate
    refusal: RbeeError | None
    serves: Serves
    plan: fit.Plan | None = None

    @property
    def fits(self) -> bool:
        """Whether a new worker fits now."""
        return self.placement is not None and self.refusal is None


def _any_device(worker: WorkerRecord) -> bool:
    return True


class Provisioner:
    """Models and workers for requests. It owns the hive's downloads and the requests waiting
    on them or on a loading worker; the pool owns the workers themselves."""

    def __init__(
        self,
        config: HiveConfig,
        node: str,
        catalog: Catalog,
        pool: WorkerPool,
        replies: Replies,
        draining: Callable[[], bool],
        lenders: Callable[[], tuple[Lender, ...]] = tuple,
        metrics: HiveMetrics | None = None,
        peers: PeerBytes | None = None,
    ) -> None:
        """``lenders``: the trusted peer hives that lend memory now (rbee.hive.peers);
        ``metrics``: where downloads are counted; ``peers``: hives to fetch models from first."""
        self.config = config
        self.lenders = lenders
        self.node = node
        self.catalog = catalog
        self.pool = pool
        self.replies = replies
        self.draining = draining
        self.pulls = Pulls(
            config.data_dir / "models", metrics=metrics or HiveMetrics(node), peers=peers
        )
        self.ledger = GpuLedger()
        self._inventory: tuple[float, gpu.Inventory] | None = None

    def inventory(self) -> gpu.Inventory:
        """This machine's devices and their free memory, asked of NVML at most every
        INVENTORY_TTL_S: the hive's one loop also relays every token, and NVML's queries take
        milliseconds. Loads started meanwhile are the ledger's to count."""
        now = time.monotonic()
        if self._inventory is None or now - self._inventory[0] > INVENTORY_TTL_S:
            self._inventory = (now, gpu.detect())
        return self._inventory[1]

    def resolve(self, reference: str) -> ModelEntry:
        """The catalog entry ``reference`` names (NeedsPull for a Hub model not here yet)."""
        if self.draining():
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

    def on_ensure_worker(self, request: Request, frame: EnsureWorker) -> None:
        """Reuse a worker with a free slot holding the model, join one loading it, spawn one,
        or name one whose slots are all busy (the job will queue); a Hub model not here yet is
        downloaded first. A backend or device this hive lacks is refused before anything is
        downloaded."""
        backend = self.backend_for(frame.backend)
        try:
            entry = self.resolve(frame.model)
        except NeedsPull as need:
            if backend != "auto" or frame.device:
                self.place(_forced(backend), frame.device)
            request.require_admin(f"downloading {need.reference}")
            waiter = PullWaiter(request, "ensure", frame.n_ctx, backend, frame.device)
            self.pulls.join(need.reference, waiter)
            self.replies.send(request, Progress(phase="download", message=need.reference))
            return
        self._ensure(request, entry, frame.n_ctx, backend, frame.device)

    def backend_for(self, asked: str) -> str:
        """The backend a request gets: as asked, or the hive's pin (``--backend``) for one that
        names none."""
        return self.config.backend if asked == "auto" else asked

    def on_explain(self, request: Request, frame: Explain) -> None:
        """Where a request for ``frame.model`` would run here, and why: a worker with a free
        slot, else the placement a new worker would get, with every option weighed."""
        try:
            entry = self.resolve(frame.model)
        except NeedsPull as need:
            raise ModelNotFound(
                f"{need.reference} is not downloaded on {self.node}, so its size is unknown here",
                suggestion=f"`rbee models pull {need.reference} --node {self.node}`, then again",
            ) from None
        spot = self.spot(entry, frame.n_ctx, self.backend_for(frame.backend), frame.device)
        warm = pick_free(self.pool.records(), entry.path, serves=spot.serves)
        if spot.plan is not None:
            options = [
                PlacementOption(kind=o.kind, label=o.label, fits=o.fits, why=o.why, slots=o.slots)
                for o in spot.plan.options
            ]
        else:  # the backend was forced: the one device asked for
            assert spot.placement is not None
            why = spot.refusal.message if spot.refusal else f"needs {spot.needed.describe()}"
            options = [
                PlacementOption(
                    kind=spot.placement.backend,
                    label=spot.placement.label,
                    fits=spot.refusal is None,
                    why=why[:2048],
                    slots=spot.needed.slots,
                )
            ]
        explanation = Explanation(
            node=self.node,
            model=entry.name,
            warm=f"worker {warm.worker_id} on {warm.where}, {warm.free_slots} free slots"
            if warm is not None
            else "",
            chosen=spot.placement.label if spot.fits and spot.placement else "",
            estimate=spot.needed.describe() + self._learned(entry.path, spot),
            options=options,
            refusal=spot.refusal.message[:16000] if spot.refusal else "",
        )
        self.replies.send(request, explanation)

    def _learned(self, path: str, spot: Spot) -> str:
        """What a measured load of the file changed in a GPU estimate, for `rbee explain`."""
        factor = self.ledger.factors.get(path)
        if factor is None or spot.placement is None or spot.placement.backend != "cuda":
            return ""
        return f"; GPU memory × {factor:.2f}, as its last load measured"

    def preload(self, reference: str) -> None:
        """Start loading a worker for a model nobody asked for yet: an ephemeral hive does
        this for the model its keeper is about to ask for, so the load overlaps the keeper's
        LAN survey. A model that needs a download or does not fit waits for the request,
        which says why."""
        try:
            entry = self.resolve(reference)
            spot = self.spot(entry, 0, self.config.backend, "")
            plan = plan_worker(
                self.pool.records(), entry.path, self.config.limits, spot.fits, spot.serves
            )
            if plan.action != "spawn" or plan.evict is not None or spot.placement is None:
                return
            worker = self.spawn(entry, 0, spot.placement, spot.needed)
            logger.info("preloading", model=entry.name, worker=worker.worker_id)
        except (NeedsPull, RbeeError) as exc:
            logger.info("not preloaded", model=reference, reason=str(exc))

    def place(self, backend: str, device: str) -> Placement:
        """The device for a request now, or BACKEND_UNAVAILABLE; the CPU skips GPU detection."""
        if backend == "cpu" and not device:
            return placement.choose_device(gpu.Inventory(cpu=gpu.cpu_info()), "cpu")
        return placement.choose_device(self.inventory(), backend, device, self.node)

    def spot(self, entry: ModelEntry, n_ctx: int, backend: str, device: str) -> Spot:
        """Where a new worker of ``entry`` would go: placed automatically (``auto`` with no
        device: rbee.hive.fit over the ledger's free memory), or on the backend and device
        asked for (``auto`` naming a device means that GPU). Its ``serves`` accepts only
        workers whose slots hold the context asked for."""
        context = self.context(entry, n_ctx)
        got = self._spot(entry, context, backend, device)
        return dataclasses.replace(got, serves=_with_context(got.serves, context))

    def _spot(self, entry: ModelEntry, context: int, backend: str, device: str) -> Spot:
        if backend == "auto" and not device:
            inventory = self.ledger.available(self.inventory(), gpu.process_vram_bytes)

            def estimate_for(on: str, slots: int) -> MemoryEstimate:
                needed = placement.estimate_for_file(entry.path, context, on, slots)
                return self.ledger.corrected(entry.path, needed)

            got = fit.plan(inventory, estimate_for, self.config.parallel)
            if got.placement is None:  # nowhere here: with some layers in peers' memory?
                got = _with_borrowing(got, inventory, estimate_for, self.lenders(), self.config)
            refusal: RbeeError | None = None
            if got.placement is None:
                refusal = got.refusal(entry.name, self.node)
            return Spot(got.placement, got.estimate, refusal, _any_device, got)
        where = self.place(_forced(backend), device)
        needed = self.estimate(entry, context, where)
        try:
            placement.check_fits(needed, where, entry.name, self.node)
            refusal = None
        except RbeeError as exc:
            refusal = exc
        return Spot(
            where,
            needed,
            refusal,
            lambda w: placement.serves(w.backend, w.device, where, device) and not w.partial,
        )

    def _ensure(
        self, request: Request, entry: ModelEntry, n_ctx: int, backend: str, device: str
    ) -> None:
        quick = _serves_without_devices(backend, device)
        context = self.context(entry, n_ctx)
        warm = None
        if quick is not None:
            warm = pick_free(self.pool.records(), entry.path, serves=_with_context(quick, context))
        if warm is not None:  # the common case, answered without asking NVML anything
            assigned = WorkerAssigned(
                worker_id=warm.worker_id, model=warm.model, reused=True, load_s=0
            )
            self.replies.send(request, assigned)
            return
        spot = self.spot(entry, n_ctx, backend, device)
        plan = plan_worker(
            self.pool.records(), entry.path, self.config.limits, spot.fits, spot.serves
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
            self.replies.send(request, assigned)
            return
        if plan.action == "busy":
            self._refuse_busy(entry, spot)
        if plan.action == "spawn":
            assert spot.placement is not None  # it fits
            if plan.evict is not None:
                self.pool.stop(plan.evict, f"making room for {entry.name}")
            worker = self.spawn(entry, n_ctx, spot.placement, spot.needed)
            message = (
                f"spawned worker {worker.worker_id} (pid {worker.pid}) for {entry.name} on "
                f"{spot.placement.label}; it needs about {spot.needed.describe()}"
            )
        else:
            assert plan.worker is not None
            worker = plan.worker
            message = (
                f"waiting for worker {worker.worker_id} (pid {worker.pid}), already loading "
                f"{entry.name}"
            )
        worker.waiters.append(request)
        self.replies.send(request, Progress(phase="spawn", message=message))
        if plan.action != "spawn" and worker.loaded_fraction > 0:  # how far it got without us
            self.replies.send(request, _loading(worker))

    def on_pull_model(self, request: Request, frame: PullModel) -> None:
        """Download a Hub model into the catalog (at once if it is already here)."""
        if not is_hub_reference(frame.reference):
            raise InvalidRequest(
                f"{frame.reference!r} is not a Hugging Face reference",
                suggestion="use hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf",
            )
        try:
            entry = self.resolve(frame.reference)
        except NeedsPull as need:
            waiter = PullWaiter(request, "pull")
            self.pulls.join(need.reference, waiter, hub=frame.hub, peers=frame.peers)
            self.replies.send(request, Progress(phase="download", message=need.reference))
            return
        self.replies.send(request, _pulled(entry, downloaded=False))

    def _on_pull_finished(self, done: Finished) -> None:
        if done.error is not None:
            for waiter in done.pull.waiters:
                self.replies.error(waiter.request, done.error)
            return
        total = sum(f.size for f in done.files)
        finished = Progress(phase="download", done=total, total=total, message="verified")
        for waiter in done.pull.waiters:
            self.replies.send(waiter.request, finished)
        first = done.files[0]
        known = self.catalog.find_path(first.path)
        if known is not None:  # another spelling of a model already here
            for waiter in done.pull.waiters:
                self._after_pull(waiter, known, downloaded=False)
            return
        try:
            entry = self.catalog.add_pulled(
                first.path,
                reference=first.reference,
                repo=first.repo,
                file=first.filename,
                revision=first.commit,
                sha256=first.sha256,
                size_bytes=total,
            )
        except RbeeError as exc:  # e.g. the Hub's file is no usable GGUF: say so, stay up
            logger.warning("a pulled file was not added", path=str(first.path), error=exc.message)
            for waiter in done.pull.waiters:
                self.replies.error(waiter.request, exc)
            return
        logger.info("pulled", model=entry.name, reference=entry.reference, bytes=entry.size_bytes)
        for waiter in done.pull.waiters:
            self._after_pull(waiter, entry, downloaded=True)

    def _after_pull(self, waiter: PullWaiter, entry: ModelEntry, downloaded: bool) -> None:
        if waiter.purpose == "pull":
            self.replies.send(waiter.request, _pulled(entry, downloaded=downloaded))
            return
        try:
            self._ensure(waiter.request, entry, waiter.n_ctx, waiter.backend, waiter.device)
        except RbeeError as exc:
            self.replies.error(waiter.request, exc)

    def _refuse_busy(self, entry: ModelEntry, spot: Spot) -> None:
        """INSUFFICIENT_VRAM/RAM when the model does not fit and no worker of it runs there;
        else every slot is busy."""
        holders = [w for w in self.pool.records() if w.model_path == entry.path and spot.serves(w)]
        if spot.refusal is not None and not holders:
            raise spot.refusal
        raise AllSlotsBusy(
            f"all {self.config.limits.max_workers} workers of {self.node} are busy",
            retry_after_s=RETRY_AFTER_S,
            suggestion="try again shortly",
        )

    def estimate(self, entry: ModelEntry, n_ctx: int, where: Placement) -> MemoryEstimate:
        """What a new worker of ``entry`` needs on ``where``, with its slot count: the hive's
        ``parallel``, or (0) as many of AUTO_SLOTS as fit the free memory there."""
        context = self.context(entry, n_ctx)
        return placement.fit_slots(
            lambda slots: placement.estimate_for_file(entry.path, context, where.backend, slots),
            where.free_bytes,
            self.config.parallel,
        )

    def context(self, entry: ModelEntry, n_ctx: int) -> int:
        """The context of each slot of a worker of ``entry`` asked for ``n_ctx``."""
        return slot_context(entry.context_length, n_ctx)

    def spawn(
        self,
        entry: ModelEntry,
        n_ctx: int,
        where: Placement | None = None,
        needed: MemoryEstimate | None = None,
    ) -> WorkerRecord:
        """Start a worker for ``entry`` with ``needed.slots`` slots (its keep-alive the hive's
        default until a job ends)."""
        slots = needed.slots if needed is not None else 1
        worker = self.pool.spawn(entry.name, entry.path, self.context(entry, n_ctx), where, slots)
        worker.keep_alive_s = self.config.keep_alive_s
        if needed is not None and where is not None and where.backend == "cuda":
            per_gpu = fit.gpu_bytes(where, needed)
            worker.estimate_bytes = sum(per_gpu)  # what its GPUs hold (a partial offload's part)
            self.ledger.reserve(worker.worker_id, worker.pid, where, per_gpu)
        else:
            worker.estimate_bytes = needed.total_bytes if needed is not None else 0
        return worker

    def scale_for(self, queue: list[JobRecord]) -> None:
        """A queued job that no free or loading slot will take may get a new worker (within
        limits); the new worker's slots then count for the jobs after it."""
        if self.draining():
            return
        tried: set[str] = set()
        while True:
            records = self.pool.records()
            uncovered = waiting_for_slots(queue, records, loading=True)
            job = next((j for j in uncovered if j.job_id not in tried), None)
            if job is None:
                return
            tried.add(job.job_id)
            limits = self.config.limits
            if plan_worker(records, job.model_path, limits, True, job.runs_on).action != "spawn":
                continue  # at a limit: no need to look at memory
            try:
                entry = self.catalog.resolve(job.model, allow_files=self.config.loopback_only)
                spot = self.spot(entry, job.n_ctx, job.backend or self.config.backend, job.device)
            except RbeeError:  # e.g. a worker over several GPUs: no second copy of it
                continue
            plan = plan_worker(records, job.model_path, limits, spot.fits, job.runs_on)
            if plan.action == "spawn" and spot.placement is not None:
                if plan.evict is not None:
                    self.pool.stop(plan.evict, f"making room for {entry.name}")
                self.spawn(entry, job.n_ctx, spot.placement, spot.needed)

    def on_worker_event(self, event: Event) -> None:
        """Tell the requests waiting for a worker how its load goes, and what they got."""
        worker = event.worker
        match event.kind:
            case "registered":
                self._tell(worker, Progress(phase="registered", message=worker.worker_id))
            case "loading":
                self._tell(worker, _loading(worker))
            case "ready":
                self.ledger.release(worker.worker_id)
                if worker.backend == "cuda":  # what it holds, as it said or as NVML says now
                    held = worker.vram_bytes or gpu.process_vram_bytes(worker.pid) or 0
                    worker.vram_bytes = held
                    self.ledger.learn(worker.model_path, worker.estimate_bytes, held)
                    logger.info(
                        "gpu memory measured",
                        worker=worker.worker_id,
                        estimate_mib=worker.estimate_bytes >> 20,
                        held_mib=held >> 20,
                    )
                assigned = WorkerAssigned(
                    worker_id=worker.worker_id,
                    model=worker.model,
                    reused=False,
                    load_s=worker.load_s,
                )
                self._tell(worker, assigned)
                worker.waiters.clear()
            case "load_failed" | "exited":
                self.ledger.release(worker.worker_id)
                if event.error is not None:
                    for request in worker.waiters:
                        self.replies.error(request, event.error)
                worker.waiters.clear()

    def tick(self, now: float) -> None:
        """Answer finished downloads; keep the requests waiting on downloads and loads told."""
        for done in self.pulls.finished():
            self._on_pull_finished(done)
        for pull in self.pulls.due_progress(now):
            progress = Progress(
                phase="download",
                done=pull.done_bytes,
                total=pull.total_bytes,
                message=describe_progress(pull),
            )
            for waiter in pull.waiters:
                self.replies.send(waiter.request, progress)
        for worker in self.pool.records():
            if (
                worker.state == "loading"
                and worker.waiters
                and now - worker.last_progress >= LOAD_PROGRESS_EVERY_S
            ):
                self._tell(worker, _loading(worker))

    def _tell(self, worker: WorkerRecord, frame: Frame) -> None:
        for request in worker.waiters:
            self.replies.send(request, frame)


def _with_borrowing(
    got: fit.Plan,
    inventory: gpu.Inventory,
    estimate_for: fit.EstimateFor,
    lenders: tuple[Lender, ...],
    config: HiveConfig,
) -> fit.Plan:
    """``got`` (nothing fits here) with the option of lent memory weighed, and chosen if it
    fits."""
    where, option = fit.borrow(inventory, estimate_for, lenders, config.parallel)
    if option is None:
        return got
    options = (*got.options, option)
    if where is None:
        return dataclasses.replace(got, options=options)
    return fit.Plan(where, estimate_for("cpu", option.slots), options, got.gpus)


def _serves_without_devices(backend: str, device: str) -> Serves | None:
    """Which running workers answer a request, where that needs no device lookup (None: a
    device named by UUID, or an invalid one, which the placement resolves or refuses). A
    request that names a GPU or CUDA wants every layer there: a partial offload is no answer."""
    if backend == "auto" and not device:
        return _any_device
    if backend == "cpu" and device in ("", "cpu", "0"):
        return lambda w: w.backend == "cpu"
    if backend in ("cuda", "auto") and (not device or device.isdigit()):
        return lambda w: w.backend == "cuda" and not w.partial and device in ("", w.device)
    return None


def slot_context(trained: int, n_ctx: int) -> int:
    """The context of each slot of a worker asked for ``n_ctx`` (0: none asked) of a model
    trained on ``trained`` tokens (0: unknown): as asked, else the model's own, at most the
    default. More than the model was trained on is cut to that, as Ollama does with a
    ``num_ctx`` over the model's context length (its llm/server.go), rather than refused."""
    if n_ctx:
        return min(n_ctx, trained) if trained else n_ctx
    return min(trained or DEFAULT_CTX_TOKENS, DEFAULT_CTX_TOKENS)


def _with_context(serves: Serves, n_ctx: int) -> Serves:
    """``serves``, narrowed to workers whose slots hold ``n_ctx`` tokens of context."""
    return lambda w: serves(w) and holds_context(w, n_ctx)


def _forced(backend: str) -> str:
    """The backend a request that names a device means: ``auto`` with a device is that GPU."""
    return "cuda" if backend == "auto" else backend


def _loading(worker: WorkerRecord) -> Progress:
    return Progress(phase="loading", done=worker.loaded_fraction, total=1.0)
