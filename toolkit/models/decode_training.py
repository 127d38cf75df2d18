"""The decode network's training engine: packing, losses and the epoch loop.

``HybridLatencyModel.fit`` calls :func:`fit_decode_net`; the estimator itself only stores
parameters and the fitted network. Training, in one vectorised pass per minibatch:

- summed-sequence loss: the predicted total of a sample's ``m`` passes is
  ``coef . prefix_sum(m, P)`` (O(1) per sample, ``toolkit.models.decode``) against its
  ``T_LLM_decode``, compared in log space: a relative error, so long answers do not drown
  short ones and slow configurations do not drown fast ones, which is what the score (MAPE)
  measures. ``sum_loss="log_abs"`` (default): the absolute log error, whose minimiser is the
  conditional *median*. CPU timing noise is skewed (a busy core stretches every pass of an
  answer, nothing makes one faster), so a squared error chases the slow tail: on the bundled
  small sweep's held-out samples ``"log"`` gives decode bias 0.68 and MAPE 8.75 %
  where ``"log_abs"`` gives 0.55 and 7.70 % (``python benchmarks/accuracy.py --results-dir
  data/core_exp_small_cpu --splits sample [--sum-loss log]``); on the tiny and the simulated
  precise sweep the two agree. ``sum_loss="log"``: the squared log error (latkit 0.3).
  ``sum_loss="mse"``: the error divided by ``m * s`` (``s`` = mean pass time of the training
  data), i.e. the MSE of the mean pass time in units of a typical pass.
- per-pass loss where ``T_decode_per_step`` exists: sum over the sample's measured passes of
  ``(coef . basis(k, P) - t_k)^2``. Because the prediction is linear in ``coef`` this equals
  ``coef^T G coef - 2 coef . h + q`` with per-sample ``G = sum_k basis basis^T``,
  ``h = sum_k t_k basis``, ``q = sum_k t_k^2``, computed once before training by one
  vectorised scatter-add over the flat steps table. Each training step then costs
  O(N_BASIS^2) per sample, however many passes were measured; the value and the gradient
  are exactly those of the flat per-step MSE (a test checks it).

Loss weights: ``step_weight`` scales the per-pass term against the summed-sequence term.
``prefill_weight : decode_weight`` (2 : 1, as the original single network) weigh the two
parts of the logged ``loss``. The trees are fitted before and do not change during the decode
epochs, so the prefill term is a constant: it shifts the logged loss but not the gradient or
the choice of the best epoch (kept for continuity with the original logs).
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES, feature_matrix
from toolkit.models.decode import (
    DEFAULT_INPUTS,
    KV_UNIT,
    N_BASIS,
    DecodeNet,
    decode_basis,
    decode_basis_prefix_sum,
    prompt_tokens,
)

log = logging.getLogger(__name__)

#: Auto batch size: about this many optimizer steps per epoch, batches of at least
#: AUTO_MIN_BATCH samples (see ``auto_batch_size``).
AUTO_STEPS_PER_EPOCH = 100
AUTO_MIN_BATCH = 16
SUM_LOSSES: tuple[str, ...] = ("log", "log_abs", "mse")


def auto_batch_size(n_train: int, batch_size: int | None) -> int:
    """The decode net's minibatch: ``batch_size`` when given, else max(16, n / 100).

    Why not the original fixed 64: the net is tiny and every step costs about the same
    whatever the batch, so a fixed 64 makes 100k samples x 50 epochs take 78k steps (minutes),
    while small sets get too few steps to converge at lr 1e-3. About 100 steps per epoch
    (5000 in 50 epochs) suits both: 100k samples train in seconds, 1k samples still converge.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise LatkitError(f"--batch-size must be >= 1, got {batch_size}")
        return int(batch_size)
    return max(AUTO_MIN_BATCH, math.ceil(max(n_train, 1) / AUTO_STEPS_PER_EPOCH))


@dataclass
class EpochLog:
    epoch: int  # 1-based
    num_epochs: int
    loss: float  # combined training loss (prefill_weight * prefill + decode_weight * decode)
    decode_loss: float  # training decode loss (sum + step_weight * per-pass)
    val_loss: float  # validation decode loss (NaN without validation data)
    prefill_mae_ms: float  # trees on validation data (constant over epochs)
    decode_total_mae_ms: float  # validation (training data when no validation split)
    best: bool  # this epoch is the best so far (its weights are kept)


# Column layout of DecodeData.packed.
_F = len(FEATURE_NAMES)
_P0, _P1 = _F, _F + N_BASIS  # prefix sum of the basis at m passes
_TOT = _P1  # T_LLM_decode / s
_NP = _P1 + 1  # m passes
_G0, _G1 = _NP + 1, _NP + 1 + N_BASIS * N_BASIS  # sum basis basis^T over measured steps
_H0, _H1 = _G1, _G1 + N_BASIS  # sum t_k basis(k) / s
_Q = _H1  # sum t_k^2 / s^2
_CNT = _H1 + 1  # measured steps
_WIDTH = _CNT + 1


@dataclass
class DecodeData:
    """Per-sample training tensors of the decode net, packed for one gather per minibatch."""

    packed: torch.Tensor  # [n, _WIDTH] float32: the column layout above
    n_steps: int

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    @property
    def features(self) -> torch.Tensor:
        return self.packed[:, :_F]

    def passes(self) -> torch.Tensor:
        """Each sample's number of decode passes."""
        return self.packed[:, _NP]

    def mean_pass(self) -> torch.Tensor:
        """Each sample's mean pass time in units of the scale."""
        return self.packed[:, _TOT] / self.packed[:, _NP].clamp(min=1.0)

    def mean_kv_units(self) -> torch.Tensor:
        """Each sample's mean KV length over its passes, in KV_UNITs: P + (m + 1) / 2."""
        m = self.packed[:, _NP]
        return (prompt_tokens(self.features) + 0.5 * (m + 1.0)) / KV_UNIT


def decode_scale_ms(samples: pl.DataFrame) -> float:
    """The typical pass time (ms) of a samples frame: every unit of the losses."""
    passes = samples["n_decode_passes"].to_numpy().astype(np.float64)
    totals = samples["T_LLM_decode"].to_numpy().astype(np.float64)
    ok = (passes > 0) & np.isfinite(totals) & (totals > 0)
    scale = float(totals[ok].sum() / passes[ok].sum()) if ok.any() else 1.0
    return scale if scale > 0 else 1.0


def build_decode_data(
    samples: pl.DataFrame, steps: pl.DataFrame | None, scale_ms: float
) -> DecodeData:
    """Tensors of the samples with >= 1 decode pass and a finite, positive T_LLM_decode
    (a sample with passes but no decode time is junk, and would break the log loss)."""
    usable = samples.filter(
        (pl.col("n_decode_passes") > 0)
        & pl.col("T_LLM_decode").is_finite()
        & (pl.col("T_LLM_decode") > 0)
    )
    n = usable.height
    packed = torch.zeros(n, _WIDTH, dtype=torch.float64)
    n_steps = 0
    if n:
        features = torch.from_numpy(feature_matrix(usable).astype(np.float64))
        packed[:, :_F] = features
        passes = torch.from_numpy(usable["n_decode_passes"].to_numpy().astype(np.float64))
        packed[:, _P0:_P1] = decode_basis_prefix_sum(passes, prompt_tokens(features))
        packed[:, _TOT] = torch.from_numpy(usable["T_LLM_decode"].to_numpy().astype(np.float64))
        packed[:, _TOT] /= scale_ms
        packed[:, _NP] = passes
    if n and steps is not None and steps.height and "sample_key" in usable.columns:
        index = usable.select("sample_key").with_row_index("_pos")
        joined = steps.join(index, on="sample_key", how="inner").filter(
            (pl.col("k") >= 1) & pl.col("T_decode_pass").is_finite() & (pl.col("T_decode_pass") > 0)
        )
        if joined.height:
            rows = torch.from_numpy(joined["_pos"].to_numpy().astype(np.int64))
            k = torch.from_numpy(joined["k"].to_numpy().astype(np.float64))
            t = torch.from_numpy(joined["T_decode_pass"].to_numpy().astype(np.float64)) / scale_ms
            # One vectorised evaluation for all steps, each with its own sample's prompt.
            basis = decode_basis(k, prompt_tokens(packed[rows, :_F]))  # [S, N_BASIS]
            outer = (basis.unsqueeze(-1) * basis.unsqueeze(-2)).reshape(-1, N_BASIS * N_BASIS)
            packed[:, _G0:_G1].index_add_(0, rows, outer)
            packed[:, _H0:_H1].index_add_(0, rows, basis * t.unsqueeze(-1))
            packed[:, _Q].index_add_(0, rows, t * t)
            packed[:, _CNT].index_add_(0, rows, torch.ones_like(t))
            n_steps = int(joined.height)
    return DecodeData(packed=packed.to(torch.float32), n_steps=n_steps)


def decode_loss_terms(
    coef: torch.Tensor, batch: torch.Tensor, scale_ms: float, sum_loss: str = "mse"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed-sequence loss, per-pass loss, number of measured passes) of a packed batch.

    ``coef`` [b, N_BASIS] in ms; ``batch`` rows of ``DecodeData.packed``. Both losses are
    dimensionless (errors in units of the typical pass time ``scale_ms``). ``sum_loss="log"``
    compares log(predicted sum) with log(T_LLM_decode) instead (a relative error: its square),
    ``"log_abs"`` the absolute value of that difference (the median's loss).
    """
    c = coef / scale_ms
    pred_total = (c * batch[:, _P0:_P1]).sum(-1)
    if sum_loss in ("log", "log_abs"):
        seq_err = torch.log(pred_total.clamp(min=1e-6)) - torch.log(batch[:, _TOT].clamp(min=1e-6))
    else:
        seq_err = (pred_total - batch[:, _TOT]) / torch.clamp(batch[:, _NP], min=1.0)
    seq_loss = seq_err.abs().mean() if sum_loss == "log_abs" else (seq_err * seq_err).mean()
    gram = batch[:, _G0:_G1].reshape(-1, N_BASIS, N_BASIS)
    quad = (
        torch.einsum("bi,bij,bj->b", c, gram, c)
        - 2.0 * (c * batch[:, _H0:_H1]).sum(-1)
        + batch[:, _Q]
    )
    count = batch[:, _CNT].sum()
    pass_loss = quad.sum() / torch.clamp(count, min=1.0)
    return seq_loss, pass_loss, count


@dataclass(frozen=True)
class DecodeTraining:
    """How to train the decode network (``HybridLatencyModel``'s parameters of it)."""

    hidden: int = 64
    n_layers: int = 1
    inputs: tuple[str, ...] = DEFAULT_INPUTS
    seed: int = 3407
    num_epochs: int = 50
    batch_size: int | None = None
    lr: float = 1e-2
    step_weight: float = 1.0
    sum_loss: str = "log_abs"
    prefill_weight: float = 2.0
    decode_weight: float = 1.0
    cpu_threads: int | None = 1


def fit_decode_net(
    settings: DecodeTraining,
    train: DecodeData,
    val: DecodeData | None,
    scale_ms: float,
    norm_features: np.ndarray,
    device: str,
    *,
    prefill_term: float = 0.0,
    prefill_mae_ms: float = math.nan,
    on_epoch: Callable[[EpochLog], None] | None = None,
    progress: bool = False,
) -> tuple[DecodeNet, list[EpochLog]]:
    """Train a :class:`DecodeNet` on packed data; return it (on the CPU, eval mode) and the
    per-epoch log. The weights of the epoch with the lowest validation loss are kept (the
    training loss without validation data). ``norm_features`` standardise the inputs when
    ``train`` is empty (the net then stays at its prior)."""
    from tqdm.auto import tqdm

    if settings.sum_loss not in SUM_LOSSES:
        raise ValueError(f"sum_loss must be one of {SUM_LOSSES}, got {settings.sum_loss!r}")
    # On the CPU every op used here is deterministic already, and switching the global flag
    # costs seconds of imports (torch._inductor); on CUDA ask for deterministic kernels.
    deterministic = torch.are_deterministic_algorithms_enabled()
    if device != "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    # The net is tiny (a few thousand weights): intra-op threads buy nothing and, on a
    # shared machine, spin-wait for busy cores (measured: 3 ms per step with one thread,
    # 167 ms with two on 2 loaded cores). Same thread count also keeps results repeatable.
    threads = torch.get_num_threads()
    if device == "cpu" and settings.cpu_threads is not None:
        torch.set_num_threads(settings.cpu_threads)
    history: list[EpochLog] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            net = DecodeNet(
                hidden=settings.hidden, n_layers=settings.n_layers, inputs=settings.inputs
            )
        # Standardise over the samples the net trains on (all samples if none has a pass).
        net.set_normalisation(train.features.numpy() if train.n else norm_features, scale_ms)
        if train.n == 0:
            log.warning("No sample has a decode pass: the decode net stays at its prior.")
            return net.eval(), history
        mean_pass, kv_units = train.mean_pass(), train.mean_kv_units()
        prior_set = net.set_prior(
            train.features.numpy(),
            mean_pass.numpy(),
            kv_units.numpy(),
            train.passes().numpy(),
            settings.seed,
        )
        if not prior_set:
            net.warm_start(train.features, mean_pass, kv_units)
        net.to(device)
        data = train.packed.to(device)
        val_data = val.packed.to(device) if val is not None and val.n else None
        batch = min(auto_batch_size(train.n, settings.batch_size), train.n)
        steps_per_epoch = math.ceil(train.n / batch)
        total_steps = max(1, steps_per_epoch * settings.num_epochs)
        optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
        # Cosine decay to 5 % of lr: large early steps, fine convergence at the end.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * step / total_steps)),
        )
        generator = torch.Generator().manual_seed(settings.seed)
        best_val = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        bar = tqdm(
            range(1, settings.num_epochs + 1),
            desc="Training",
            unit="epoch",
            disable=not progress,
            file=sys.stderr,
            leave=False,
        )
        for epoch in bar:
            net.train()
            order = torch.randperm(train.n, generator=generator).to(device)
            epoch_loss = torch.zeros((), device=device)
            for start in range(0, train.n, batch):
                rows = data[order[start : start + batch]]
                seq, per_pass, _ = decode_loss_terms(
                    net(rows[:, :_F]), rows, scale_ms, settings.sum_loss
                )
                loss = seq + settings.step_weight * per_pass
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                epoch_loss += loss.detach() * rows.shape[0]
            decode_train = float(epoch_loss) / train.n
            net.eval()
            with torch.no_grad():
                ref = val_data if val_data is not None else data
                coef = net(ref[:, :_F])
                seq, per_pass, _ = decode_loss_terms(coef, ref, scale_ms, settings.sum_loss)
                val_loss = float(seq + settings.step_weight * per_pass)
                pred_total = (coef * ref[:, _P0:_P1]).sum(-1)
                mae = float((pred_total - ref[:, _TOT] * scale_ms).abs().mean())
            is_best = val_loss < best_val
            if is_best:
                best_val = val_loss
                best_state = copy.deepcopy(net.state_dict())
            entry = EpochLog(
                epoch=epoch,
                num_epochs=settings.num_epochs,
                loss=settings.prefill_weight * prefill_term + settings.decode_weight * decode_train,
                decode_loss=decode_train,
                val_loss=val_loss if val_data is not None else math.nan,
                prefill_mae_ms=prefill_mae_ms,
                decode_total_mae_ms=mae,
                best=is_best,
            )
            history.append(entry)
            bar.set_postfix(loss=f"{entry.loss:.4g}", dec_mae=f"{mae:.3g}ms")
            if on_epoch is not None:
                on_epoch(entry)
        bar.close()
        if best_state is not None:
            net.load_state_dict(best_state)
        return net.cpu().eval(), history
    finally:
        torch.set_num_threads(threads)
        if device != "cpu":
            torch.use_deterministic_algorithms(deterministic)
