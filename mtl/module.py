"""The LightningModule: per-task losses, a balancer that turns them into one update, metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer

from mtl.balancers.base import BalanceContext, Balancer
from mtl.balancers.diagnostics import conflict_statistics
from mtl.balancers.jacobian import TaskGradients, gramian
from mtl.batch_parts import running_stats_set_aside, split_batch
from mtl.checkpoint import CONFIG_KEY, SIGNATURE_KEY, check_compatible
from mtl.config import ConfigError
from mtl.data.agreement import agree_on_batch, agree_on_failure
from mtl.data.base import DatasetError
from mtl.data.skip import bad_sample, is_empty
from mtl.distributed import gather_before_stopping
from mtl.metrics.collection import TaskMetrics
from mtl.models.multitask import Decoded, MultiTaskModel
from mtl.numerics import Buffers, StepGuard, agree, nonfinite_gradients, nonfinite_losses
from mtl.optim import rebuild_schedule
from mtl.regularizers.base import RepresentationRegularizer
from mtl.slim.apply import Slimming
from mtl.slim.training import SandwichStep
from mtl.steps import logging_step
from mtl.tasks import get_task

log = logging.getLogger(__name__)


#: Key of the learning-rate schedule's length (optimiser steps) inside a checkpoint.
SCHEDULE_KEY = "mtl_schedule_steps"


class MultiTaskModule(L.LightningModule):
    """Trains a `MultiTaskModel` with manual optimisation.

    Manual optimisation lets the balancer own the backward pass: it decides how the task losses
    become gradients (a weighted sum, per-task gradients combined, perturbed re-evaluations),
    while this module stays the same for every method.

    Args:
        model: backbone + heads.
        balancer: the gradient-balancing method.
        loss_weights: static weight per task, applied before the balancer.
        loss_options: keyword arguments of a task's loss (``data.loss_options``), e.g.
            ``{"edge": {"pos_weight": 0.88}}``.
        num_classes: class count per classification task (for its metrics).
        optimizer: partial, called with the parameters.
        scheduler: partial, called as ``scheduler(optimizer, total_steps=N)``; stepped per step.
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping).
        seed: the run's seed, handed to balancers that draw random numbers.
        diagnostics_every: log gradient-conflict statistics every this many steps (0: never).
        metrics: the evaluation metrics (default: each task's registry metrics, no options).
        max_bad_steps: consecutive steps with a non-finite loss, gradient or buffer (each
            skipped, see ``mtl.numerics``) after which training stops.
        regularizer: a term on the shared representation whose gradient is added to the
            balancer's update (``mtl.regularizers``), or None.
        slimming: a slimmable model's training rule (``mtl.slim``: the sandwich rule and
            configuration-invariant distillation); None, or an exported sub-network: plain steps.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        balancer: Balancer,
        loss_weights: Mapping[str, float],
        num_classes: Mapping[str, int],
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        grad_clip_norm: float | None = None,
        seed: int = 0,
        diagnostics_every: int = 0,
        metrics: TaskMetrics | None = None,
        max_bad_steps: int = 3,
        regularizer: RepresentationRegularizer | None = None,
        slimming: Slimming | None = None,
        loss_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.balancer = balancer
        self.tasks: list[str] = list(model.tasks)  # the reported tasks (evaluated, scored)
        # trained: the reported tasks and the training-only ones (auxiliary heads)
        self.training_tasks: list[str] = [*model.tasks, *model.aux_tasks]
        self.loss_weights = {
            t: float(loss_weights.get(t, get_task(t).loss_weight)) for t in self.training_tasks
        }
        self.loss_options = {t: dict(o or {}) for t, o in (loss_options or {}).items()}
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_clip_norm = grad_clip_norm
        self.seed = seed
        self.diagnostics_every = diagnostics_every
        self.metrics = metrics if metrics is not None else TaskMetrics(self.tasks, num_classes)
        self.guard = StepGuard(max_bad_steps)
        self.regularizer = regularizer
        self.slimming = slimming if slimming is not None and slimming.fixed is None else None
        # restored when a step is skipped: BatchNorm statistics, the balancer's loss statistics
        self.step_buffers = Buffers({"model": self.model, "balancer": self.balancer})
        self._evaluation_fault: str | None = None  # a bad sample met in this evaluation epoch

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.model(images, tasks)

    # ---------------------------------------------------------------- losses
    def task_losses(
        self,
        preds: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
        tasks: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted loss of each task (default: the reported tasks)."""
        return {
            t: get_task(t).loss(preds[t], batch[t], **self.loss_options.get(t, {}))
            for t in tasks or self.tasks
        }

    def weighted(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: self.loss_weights[t] * loss for t, loss in losses.items()}

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        # every process takes the same decision on empty batches and bad samples
        if not agree_on_batch(
            batch, self.trainer.world_size, self._sum_over_processes, self._gather, self.device
        ):
            return None
        images = batch["image"]
        self.step_buffers.save()
        decoded: list[Decoded] = []
        sandwich = (
            SandwichStep(self.slimming, self.model, self.seed * 1_000_003 + self.global_step)
            if self.slimming is not None
            else None
        )

        def compute_losses(
            tasks: Sequence[str] | None = None, part: Mapping[str, Any] | None = None
        ) -> dict[str, Tensor]:
            rows = batch if part is None else part
            tasks = tasks or self.training_tasks
            out = self.model.decode(
                rows["image"],
                tasks,
                detach_features=self.balancer.uses_representation,
                probe_features=self.regularizer is not None,
                keep_stem=self.balancer.uses_stem and part is None,
            )
            if part is None:
                decoded[:] = [out]
            losses = self.weighted(self.task_losses(out.preds, rows, tasks))
            for task, extra in self.model.auxiliary_losses().items():  # e.g. MoE load balancing
                losses[task] = losses[task] + extra
            if sandwich is not None:  # the same sub-networks at every evaluation of the step
                losses = sandwich.add_subnetworks(
                    self.model,
                    losses,
                    out.features,
                    rows,
                    tasks,
                    lambda preds, rows, tasks: self.weighted(self.task_losses(preds, rows, tasks)),
                )
            return losses

        def part_losses(parts: int) -> list[dict[str, Tensor]]:
            small = ["batch"] if images.shape[0] < parts else []
            if agree(small, self._sum_over_processes, images.device) and not small:
                # Every process stops, not only the one whose batch is short (no hang in DDP).
                raise ValueError(
                    f"data.batch_size: another process's batch has fewer than {parts} samples, "
                    f"the independent parts the balancer splits each batch into; use a "
                    f"data.batch_size of at least {parts} per process"
                )
            # Normalisation statistics are updated by the step's own forward pass only.
            with running_stats_set_aside(self.model):
                return [compute_losses(part=p) for p in split_batch(batch, parts)]

        losses = compute_losses()
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        if bad := agree(nonfinite_losses(losses), self._sum_over_processes, images.device):
            return self._skip_step(optimizer, "loss", bad, losses)
        context = BalanceContext(
            shared_params=self.model.shared_parameters(),
            task_params=self.model.task_parameters(),
            backward=self.manual_backward,
            recompute_losses=compute_losses,
            all_reduce_mean=lambda t: self.trainer.strategy.reduce(t, reduce_op="mean"),
            step=self.global_step,
            epoch=self.current_epoch,
            seed=self.seed,
            world_size=self.trainer.world_size,
            features=decoded[0].features,
            head_inputs=decoded[0].head_inputs,
            model=self.model,
            part_losses=part_losses,
            stem=decoded[0].stem,
            stem_params=() if decoded[0].stem is None else self.model.backbone.stem_parameters(),
        )
        regularizer_grads = self._regularizer_gradients(losses, decoded[0], context)
        if sandwich is not None:  # distillation: weight 1, outside the balancer, like a regulariser
            distill_grads = sandwich.distill_gradients(self._regularized_params())
        diagnose = bool(self.diagnostics_every) and self.global_step % self.diagnostics_every == 0
        gram = None
        if diagnose and not self.balancer.needs_task_gradients:
            # Loss-only methods never form task gradients: form them on diagnostic steps only.
            gram = gramian(TaskGradients.compute(losses, context, retain_graph=True).jacobian)
        result = self.balancer.backward(losses, context)
        if regularizer_grads is not None:  # weight 1, no part of the balancer's surgery
            self._add_gradients(regularizer_grads)
        if sandwich is not None:
            self._add_gradients(distill_grads)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        gradients = nonfinite_gradients(params, context.task_params, result.gramian)
        buffers = self.step_buffers.nonfinite()
        if bad := agree(buffers + gradients, self._sum_over_processes, images.device):
            what = " and ".join(
                kind for kind, seen in (("buffer", buffers), ("gradient", gradients)) if seen
            ) or "gradient or buffer"  # seen on another process
            return self._skip_step(optimizer, what, bad, losses)
        self.guard.good()
        if self.grad_clip_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.grad_clip_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        total = torch.stack(list(losses.values())).sum().detach()
        batch_size = images.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        if sandwich is not None and sandwich.distill is not None:
            self.log("train/slim/distill", sandwich.distill.detach(), batch_size=batch_size)
        if self._loggers_write_this_step():
            for task, loss in losses.items():
                self.log(
                    f"train/{task}/loss",
                    loss.detach() / self.loss_weights[task],
                    batch_size=batch_size,
                )
                self.log(f"balancer/{task}/weight", result.weights[task], batch_size=batch_size)
            self.log_dict(self.model.routing_statistics(per_expert=diagnose), batch_size=batch_size)
        gram = result.gramian if gram is None else gram
        if diagnose and gram is not None:
            self._log_now(conflict_statistics(gram, list(losses)))
        return total

    def _regularized_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _add_gradients(self, grads: Sequence[Tensor | None]) -> None:
        """Add gradients of a term outside the balancer, one per `_regularized_params` entry."""
        for p, g in zip(self._regularized_params(), grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def _regularizer_gradients(
        self, losses: Mapping[str, Tensor], decoded: Decoded, context: BalanceContext
    ) -> list[Tensor | None] | None:
        """The representation regulariser's gradient per trainable model parameter (None
        without a regulariser), its terms logged; computed before the balancer, which may
        free the forward graph."""
        if self.regularizer is None:
            return None
        grads, values = self.regularizer.gradients(
            losses,
            decoded,
            self._regularized_params(),
            context.shared_params,
            context.all_reduce_mean if context.world_size > 1 else None,
        )
        batch_size = decoded.features[0].shape[0]
        for key, value in values.items():
            self.log(key, value, batch_size=batch_size)
        return grads

    def _log_now(self, values: Mapping[str, float]) -> None:
        """Hand `values` to the loggers at this step only. ``self.log`` keeps a value logged on
        one step and hands it to the loggers again on every later step of the epoch (and only
        on steps where the loggers write); gradient statistics of the diagnostic steps would be
        repeated on steps they were not computed on."""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(dict(values), step=logging_step(self.trainer))

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning hands this training step's values to the loggers (every
        ``trainer.log_every_n_steps`` steps). Per-step values logged on the other steps only
        cost Lightning's per-call bookkeeping (a few percent of a step with five tasks); Lightning
        exposes the decision only on its logger connector, hence the guarded private access."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _sum_over_processes(self, value: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def _gather(self, value: Any) -> list[Any]:
        return gather_before_stopping(self.trainer, value)

    def _skip_step(
        self, optimizer: Optimizer, what: str, where: list[str], losses: Mapping[str, Tensor]
    ) -> Tensor:
        """Zero the gradients, leave optimiser and scheduler untouched, put the buffers back
        as the step found them, log the tasks."""
        optimizer.zero_grad(set_to_none=True)
        self.step_buffers.restore()
        self.log("train/skipped_steps", float(self.guard.skipped + 1), reduce_fx="max")
        self.guard.bad(what, where, self.global_step, self.current_epoch)
        return torch.stack([loss.detach() for loss in losses.values()]).sum()

    # ---------------------------------------------------------------- evaluation
    def _evaluation_step(self, batch: dict, stage: str) -> dict[str, Tensor]:
        """Losses and metric updates of one batch; returns the predictions (for callbacks)."""
        if (message := bad_sample(batch)) is not None:  # data.skip_bad=false, under DDP
            # the processes may hold different numbers of batches: agree at the epoch's end
            self._evaluation_fault = self._evaluation_fault or message
            return {}
        if is_empty(batch):  # every sample of the batch was bad (data.skip_bad)
            return {}
        images = batch["image"]
        preds = self.model(images, self.tasks)
        losses = self.task_losses(preds, batch)
        total = torch.stack(list(self.weighted(losses).values())).sum()
        self.metrics.update_losses(losses, total, batch_size=images.shape[0])  # logged per epoch
        self.metrics.update(preds, batch)
        return preds

    def _log_metrics(self, stage: str) -> None:
        """Log the epoch's dataset-level scores and reset the metrics; first, stop every
        process when any met a bad sample."""
        message, self._evaluation_fault = self._evaluation_fault, None
        if self.trainer.world_size > 1:
            agree_on_failure(message, self._sum_over_processes, self._gather, self.device)
        elif message is not None:
            raise DatasetError(message)
        for key, value in self.metrics.compute().items():
            # already synced by torchmetrics: the average over ranks of equal values is a no-op
            self.log(f"{stage}/{key}", value, sync_dist=True, prog_bar=key == "loss")
        self.metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                "optim.scheduler: a learning-rate schedule needs the run's length; with "
                "trainer.max_epochs=-1 set +trainer.max_steps=N, or optim.scheduler=null"
            )
        self.schedule_steps = int(total)
        scheduler = self.scheduler_factory(optimizer, total_steps=self.schedule_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---------------------------------------------------------------- checkpoints
    #: set by the caller (``mtl.train``): what a checkpoint must match (`model_signature`) and
    #: the run's resolved config as plain containers; both are stored in every checkpoint.
    checkpoint_signature: dict | None = None
    checkpoint_config: dict | None = None
    #: the learning-rate schedule's length of this fit, and that of the checkpoint it resumes
    schedule_steps: int | None = None
    _restored_schedule_steps: int | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The balancer is a submodule: its learned weights, loss history and optimiser state
        # (uncertainty log-variances, DWA, FAMO) are in ``state_dict`` already.
        if self.checkpoint_signature is not None:
            checkpoint[SIGNATURE_KEY] = self.checkpoint_signature
        if self.checkpoint_config is not None:
            checkpoint[CONFIG_KEY] = self.checkpoint_config
        if self.schedule_steps is not None:
            checkpoint[SCHEDULE_KEY] = self.schedule_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before the weights are loaded: refuse another model with a message naming
        # what differs instead of a list of mismatched tensor shapes.
        check_compatible(checkpoint, self.checkpoint_signature)
        self._restored_schedule_steps = checkpoint.get(SCHEDULE_KEY)

    def on_train_start(self) -> None:
        self.step_buffers.find()  # after the strategy's changes (SyncBatchNorm replaces modules)
        # Lightning has restored the scheduler by now, with the length of the run that saved
        # it: when this fit is longer or shorter (trainer.max_epochs, limit_train_batches, batch
        # size), follow the new length from the step reached instead.
        saved, self._restored_schedule_steps = self._restored_schedule_steps, None
        if saved is None or self.schedule_steps is None or saved == self.schedule_steps:
            return
        config = self.trainer.lr_scheduler_configs[0]
        config.scheduler = rebuild_schedule(
            self.scheduler_factory, config.scheduler, self.schedule_steps
        )
        log.info(
            "learning-rate schedule %s from %d to %d steps (the run's length changed); "
            "continuing at step %d",
            "extended" if self.schedule_steps > saved else "shortened",
            saved,
            self.schedule_steps,
            config.scheduler.last_epoch,
        )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str, map_location: Any = None, *args: Any, **kwargs: Any
    ) -> MultiTaskModule:
        """The module of a checkpoint written by ``train.py``, rebuilt from the config stored
        in it (`mtl.api.load_module`), in eval mode. For inference, ``mtl.load(path)`` gives
        the model with its tasks, class names and input transform."""
        from mtl.api import load_module  # local: mtl.api builds modules through mtl.train

        return load_module(checkpoint_path, map_location=map_location)
