"""Post-hoc calibration as defenses: temperature scaling and the last-layer Laplace approximation.

Hintersdorf et al. ("To Trust or Not To Trust Prediction Scores for Membership Inference Attacks", IJCAI
2022) study how calibration and overconfidence change membership attacks; these two defenses put the
calibration methods they use into the bank, so an audit or a sweep measures them like any other defense.
Both train each model with the spec's recipe on the step loop (`base.train_plain`, as MemGuard does), then fit
a per-model calibrator, kept beside the model object (a weak reference, keyed by the model, as MemGuard
keeps its classifier g) for `postprocess_logits`. Since they override `fit`, their models train one at a
time (`Defense.trains_itself`); the model's weights are those of plain training with the recipe.

**temperature_scaling** (Guo, Pleiss, Sun & Weinberger, ICML 2017; reference code
github.com/gpleiss/temperature_scaling): the released logits are z / T. `fit: held_out` fits T per model by
minimising the NLL of the model's logits on held-out labelled points; `fit: fixed` uses
`temperature`. Reference vs raymia:

- the reference fits T on a validation split of the training data with LBFGS (lr 0.01, 50 iterations,
  starting at T = 1.5). Here the held-out points are PUBLIC points (`FitJob.reference_x`/`reference_y`:
  training points outside the audited population, a seeded subset of as many as the model has members),
  never audited points; a plan that leaves none is refused (`require_public`), as is a class split whose
  public classes are none of the audited ones (their labels are classes the model never learnt);
- T is found by bisection on the sign of the NLL's derivative in beta = 1 / T (the NLL of beta * z is
  convex in beta, so its minimiser is where that derivative changes sign; float64, to machine precision
  in log T), restricted to T in [0.01, 100]; LBFGS reaches the same minimiser when it converges;
- T is recorded per model (`FitJob.report["temperature"]`, the audit's `defense/temperature`: the mean over
  the bank), with `fixed` too. The released logits are z / T (not log-probabilities): their softmax is the
  calibrated vector, and T > 0 keeps every predicted label.

**llla** (Kristiadi, Hein & Hennig, ICML 2020, "Being Bayesian, even just a bit, fixes overconfidence in
ReLU networks"): a Gaussian posterior over the last nn.Linear layer (weights W [C, D] and bias b) at the
MAP (the trained weights), precision = the curvature of the training loss (the cross-entropy summed over
the model's own members, as the paper fits it on the training set) + `prior_precision` x I, and the probit
(MacKay) predictive p = softmax(mu / sqrt(1 + pi/8 var)), mu the MAP logits and var the per-class variance
of the linear logits under the posterior. Released: log p, floored at LOG_FLOOR (as `confidence` does).
With features phi (the last layer's input) and Lambda_i = diag(p_i) - p_i p_i^T at the MAP:

- `hessian: diag`: the exact diagonal of the generalised Gauss-Newton matrix (for softmax cross-entropy the
  GGN is the Fisher): H_W[k, j] = sum_i p_ik (1 - p_ik) phi_ij^2 + prior, H_b[k] = sum_i p_ik (1 - p_ik) +
  prior; var_k = sum_j phi_j^2 / H_W[k, j] + 1 / H_b[k] (the `laplace` library's DiagLLLaplace with its
  GGN backend);
- `hessian: kfac`: the weight block as a Kronecker product (sum_i phi_i phi_i^T) x (mean_i Lambda_i) (the
  exact expectation of Lambda, not a Monte-Carlo sample of it), the bias block exact (sum_i Lambda_i), the
  prior added exactly through the factors' eigendecompositions (as the `laplace` library's KronLLLaplace
  does); var_k is the k-th diagonal entry of the logits' covariance.

Reference vs raymia: the `laplace` library (`LLLaplace`, default prior precision 1, probit link for the GLM
predictive) finds the last layer as the last leaf module a forward pass calls, which must be an nn.Linear;
raymia does the same and also accepts constant `Scale` modules after it (airbench's logit scale c: the
logits are c (W phi + b), so the curvature and variance carry c^2). The authors' code
(wiseodd/last_layer_laplace, `paper/laplace/llla.py`) uses BackPACK's Monte-Carlo KFAC with running
averages over batches, adds the prior as sqrt(prior) to each Kronecker factor (an approximation), tunes the
prior variance by a grid search on the in-distribution validation NLL plus the mean negative
log-probability (over all classes) of out-of-distribution inputs, and integrates the predictive by
Monte-Carlo sampling of the full C x C logit covariance; raymia takes the prior precision as a parameter
(a sweep searches it: log [0.01, 100]) since an audit has no out-of-distribution validation set, uses
the deterministic probit approximation (no sampling: queries are reproducible) and only the diagonal of
the logit covariance (as the probit link does). The prior matters:
on digits (an MLP with 256 hidden units, ~150 members, fitted to near-zero training loss, so the
curvature is small) the default precision 1 leaves a mean test confidence of 0.23 (the MAP model's: 0.93)
and 100 leaves 0.86, so sweeps should search it. The curvature is computed on the members without
augmentation, in float32 eval mode, accumulated in float64. Unlike temperature scaling, the probit can
change the predicted label (its per-class factors differ), rarely: on that digits model it keeps every
member's label and 98% of the test split's (tests/test_calibration.py).

Query path: `postprocess_logits` sees only the logits, so `llla` registers a forward hook on the last
layer that keeps the features of the latest forward; `postprocess_logits` takes them and checks that they
give back the logits it was handed (c (W phi + b) = logits), so features of another batch are never used.
This is the path of `raymia.train.infer.query_logits` (one model, as the bank queries the models of a
defense that trains itself).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses.base import (
    DEFENSES,
    OUTPUT_CHUNK,
    Defense,
    FitJob,
    meta_model,
    outputs,
    public_has_audited_classes,
    require_public,
    train_plain,
)
from raymia.defenses.simple import LOG_FLOOR
from raymia.errors import SpecError
from raymia.registry import ActsWhen, Params
from raymia.space import Categorical, Domain, Float

T_MIN, T_MAX = 1e-2, 1e2  # the range of a fitted temperature

# --------------------------------------------------------------------------------------------------------
# temperature scaling


class TemperatureParams(Params):
    """Temperature scaling's parameters."""

    fit: Literal["held_out", "fixed"] = Field(
        "held_out", description="held_out: T minimises the NLL on public held-out points, per model (needs "
        "public points); fixed: T = temperature")
    temperature: float = Field(1.5, gt=0.0, description="T when fit is fixed (logits / T; T > 1 flattens)")

    acts_when = {"temperature": ActsWhen("fit", ("fixed",))}


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of logits / T (float64)."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = T_MIN, high: float = T_MAX,
                    iters: int = 200) -> float:
    """The temperature T in [low, high] that minimises the mean NLL of logits / T on (logits, labels).

    With beta = 1 / T, NLL(beta) = mean_i logsumexp(beta z_i) - beta z_iy is convex in beta, and its
    derivative mean_i (E_{softmax(beta z_i)}[z_i] - z_iy) is non-decreasing: bisection on its sign (in log
    beta) finds the minimiser; the range's end when the minimum lies beyond it."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"expected logits [N, C] and labels [N] with N > 0, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    z = logits.detach().double()
    zy = z.gather(1, labels.long().view(-1, 1).to(z.device)).mean()

    def slope(log_beta: float) -> float:
        p = torch.softmax(z * math.exp(log_beta), dim=1)
        return float((p * z).sum(dim=1).mean() - zy)

    lo, hi = -math.log(high), -math.log(low)  # log beta
    if slope(lo) >= 0:
        return float(high)
    if slope(hi) <= 0:
        return float(low)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-13:
            break
    return float(math.exp(-0.5 * (lo + hi)))


@DEFENSES.register(
    "temperature_scaling", TemperatureParams,
    doc="Temperature scaling (Guo et al. 2017): released logits / T, T fitted per model on public held-out "
        "points (NLL) or fixed; labels kept")
class TemperatureScaling(Defense):
    """Plain training with the recipe, then logits / T (see the module docstring)."""

    params: TemperatureParams

    def __init__(self, params: TemperatureParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing)
        self._temperatures: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()

    def check_data(self, data: Any, population: Any) -> None:
        """`held_out` fits T on public points of the classes the model learns: refuse a plan without."""
        if self.params.fit != "held_out":
            return
        require_public(self.name, data, population, "to fit the temperature on (held-out points)",
                       ", or set defense.params.fit: fixed")
        if not public_has_audited_classes(data, population):
            raise SpecError(f"{self.name} (fit: held_out) needs public points of the audited classes to fit "
                            "the temperature on; the public split holds only other classes (a class split): "
                            "set defense.params.fit: fixed", where="data.private_classes")

    def fit(self, job: FitJob) -> nn.Module:
        """Train model m with the recipe, then fit T on the public reference points (held_out); reports
        ``temperature``."""
        if self.params.fit == "held_out" and (job.reference_x is None or job.reference_x.shape[0] == 0):
            raise SpecError(f"{self.name} (fit: held_out) needs public held-out points (training points "
                            "outside the audited population)", where="plan.population")
        model = train_plain(self, job)
        if self.params.fit == "held_out":
            t = fit_temperature(outputs(model, job.reference_x), job.reference_y)
            self._temperatures[model] = t
        else:
            t = self.params.temperature
        job.report["temperature"] = float(t)
        return model

    def temperature(self, model: nn.Module) -> float:
        """The temperature applied to `model`'s logits."""
        if self.params.fit == "fixed":
            return self.params.temperature
        try:
            return self._temperatures[model]
        except KeyError:
            raise RuntimeError("temperature_scaling: no fitted temperature for this model "
                               "(TemperatureScaling.fit fits it)") from None

    def postprocess_logits(self, model: nn.Module, logits: torch.Tensor, generator: torch.Generator
                           ) -> torch.Tensor:
        return logits / self.temperature(model)

    @property
    def modifies_outputs(self) -> bool:
        return not (self.params.fit == "fixed" and self.params.temperature == 1.0)

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"fit": Categorical(("held_out", "fixed")), "temperature": Float(0.25, 4.0, log=True)}


# --------------------------------------------------------------------------------------------------------
# last-layer Laplace


class LLLAParams(Params):
    """The last-layer Laplace approximation's parameters."""

    prior_precision: float = Field(1.0, gt=0.0, description="precision of the isotropic Gaussian prior on "
                                   "the last layer's weights and bias (the laplace library's default: 1)")
    hessian: Literal["diag", "kfac"] = Field("diag", description="curvature of the posterior precision: "
                                             "diag (exact diagonal GGN) or kfac (Kronecker-factored weight "
                                             "block, exact bias block)")


# Modules that may follow the last Linear: the logits are then c x its output (c: the product of the Scales).
_PASS = (nn.Identity, nn.Dropout)


def _is_scale(module: nn.Module) -> bool:
    from raymia.models.base import Scale

    return isinstance(module, Scale)


def find_last_layer(model: nn.Module, x: torch.Tensor) -> tuple[nn.Linear, float]:
    """The last nn.Linear a forward pass on x calls, and the constant c the logits are of its output (the
    product of the `Scale` modules called after it). Raises SpecError when a module other than a Scale,
    an Identity or a Dropout runs after it, or when no Linear runs."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, args, out: order.append(mod))
               for m in model.modules() if next(iter(m.children()), None) is None]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    last = max((i for i, m in enumerate(order) if isinstance(m, nn.Linear)), default=None)
    if last is None:
        raise SpecError("llla needs a model whose logits come from a last nn.Linear layer; this one runs "
                        "none", where="model.name")
    scale = 1.0
    for m in order[last + 1:]:
        if _is_scale(m):
            scale *= float(m.factor)
        elif not isinstance(m, _PASS):
            raise SpecError(f"llla needs a model whose logits are its last nn.Linear's output (times "
                            f"constant Scale factors); {type(m).__name__} runs after it", where="model.name")
    return order[last], scale


@dataclass
class LaplacePosterior:
    """The Gaussian posterior over the last layer of one model, and the features its forward hook keeps.

    diag: `var_w` [C, D] and `var_b` [C] are the inverse precisions. kfac: the weight block's eigen
    factors `u_a` [D, D], `a_eig` [D], `u_g` [C, C], `g_eig` [C] (c^2 folded into g), and `var_b` [C] the
    diagonal of the bias block's inverse. Everything float64."""

    layer: nn.Linear
    scale: float
    prior_precision: float
    hessian: str
    var_w: torch.Tensor | None = None
    var_b: torch.Tensor | None = None
    u_a: torch.Tensor | None = None
    a_eig: torch.Tensor | None = None
    u_g: torch.Tensor | None = None
    g_eig: torch.Tensor | None = None
    features: torch.Tensor | None = None  # the input of `layer` in the latest forward
    handle: Any = None

    def logit_variance(self, phi: torch.Tensor) -> torch.Tensor:
        """Per-class variance of the logits [N, C] under the posterior, for features phi [N, D]."""
        phi = phi.double().flatten(1)
        c2 = self.scale ** 2
        if self.hessian == "diag":
            var = (phi ** 2) @ self.var_w.T
        else:
            a2 = (phi @ self.u_a) ** 2  # [N, D]
            s = a2 @ (1.0 / (self.a_eig[:, None] * self.g_eig[None, :] + self.prior_precision))  # [N, C]
            var = s @ (self.u_g ** 2).T
        if self.var_b is not None:
            var = var + self.var_b
        return c2 * var

    def map_logits(self, phi: torch.Tensor) -> torch.Tensor:
        return self.scale * self.layer(phi)


@torch.no_grad()
def features_and_logits(model: nn.Module, layer: nn.Linear, x: torch.Tensor,
                        chunk: int = OUTPUT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's inputs [N, D] and the model's logits [N, C] on x (eval mode, float32)."""
    kept: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: kept.append(args[0].detach().float()))
    was = model.training
    model.eval()
    try:
        logits = torch.cat([model(x[i:i + chunk]).float() for i in range(0, x.shape[0], chunk)])
    finally:
        model.train(was)
        handle.remove()
    return torch.cat(kept).flatten(1), logits


def fit_laplace(model: nn.Module, x: torch.Tensor, prior_precision: float = 1.0,
                hessian: str = "diag") -> LaplacePosterior:
    """The last-layer Laplace posterior of `model` at its weights (the MAP), with the GGN of the
    cross-entropy summed over the training inputs x (see the module docstring)."""
    if x.shape[0] == 0:
        raise ValueError("llla: no training inputs to fit the posterior on")
    layer, scale = find_last_layer(model, x[:2])
    phi, logits = features_and_logits(model, layer, x)
    post = LaplacePosterior(layer=layer, scale=scale, prior_precision=float(prior_precision), hessian=hessian)
    check_features(post, phi, logits)
    phi = phi.double()
    p = torch.softmax(logits.double(), dim=1)
    c2 = scale ** 2
    delta = float(prior_precision)
    has_bias = layer.bias is not None
    if hessian == "diag":
        pq = p * (1 - p)  # [N, C]: the GGN's diagonal factor Lambda_kk
        post.var_w = 1.0 / (c2 * pq.T @ (phi ** 2) + delta)  # [C, D]
        post.var_b = 1.0 / (c2 * pq.sum(0) + delta) if has_bias else None
    elif hessian == "kfac":
        n = phi.shape[0]
        lam_sum = torch.diag(p.sum(0)) - p.T @ p  # sum_i Lambda_i  [C, C]
        a_eig, u_a = torch.linalg.eigh(phi.T @ phi)
        g_eig, u_g = torch.linalg.eigh(c2 * lam_sum / n)
        post.u_a, post.a_eig, post.u_g, post.g_eig = u_a, a_eig.clamp_min(0), u_g, g_eig.clamp_min(0)
        if has_bias:
            b_eig, u_b = torch.linalg.eigh(c2 * lam_sum)
            post.var_b = (u_b ** 2) @ (1.0 / (b_eig.clamp_min(0) + delta))
    else:
        raise ValueError(f"llla: unknown hessian {hessian!r}; accepted: diag, kfac")
    return post


def check_features(post: LaplacePosterior, phi: torch.Tensor, logits: torch.Tensor) -> None:
    """The kept features must give back the logits: c (W phi + b) = logits (float32 rounding aside)."""
    if phi.shape[0] != logits.shape[0]:
        raise RuntimeError(f"llla: kept features of {phi.shape[0]} points for logits of {logits.shape[0]}")
    with torch.no_grad():
        again = post.map_logits(phi.to(post.layer.weight.dtype)).float()
    tol = 1e-4 * (1.0 + logits.abs().max().item())
    if not torch.allclose(again, logits.float(), rtol=1e-4, atol=tol):
        raise RuntimeError("llla: the last layer's features do not give back the model's logits (a model "
                           "whose output is not its last Linear's, or features of another batch)")


def probit_log_probs(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log softmax(mu / sqrt(1 + pi/8 var)) (the probit / MacKay approximation), floored at LOG_FLOOR."""
    kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * var.double())
    return torch.log_softmax(mu.double() * kappa, dim=1).clamp_min(LOG_FLOOR)


@DEFENSES.register(
    "llla", LLLAParams,
    doc="Last-layer Laplace approximation (Kristiadi et al. 2020): Gaussian posterior over the last Linear "
        "layer (diag or KFAC GGN over the members + prior), probit predictive released as log-probabilities")
class LastLayerLaplace(Defense):
    """Plain training with the recipe, then a last-layer Laplace posterior per model; queries release its
    probit predictive (see the module docstring)."""

    params: LLLAParams

    def __init__(self, params: LLLAParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing)
        self._posteriors: weakref.WeakKeyDictionary[nn.Module, LaplacePosterior] = weakref.WeakKeyDictionary()

    def check(self, model_name: str, info: DataInfo, model_params: dict | None = None, recipe: Any = None) -> None:
        """Refuse a model whose logits are not its last Linear's output (a meta-device forward)."""
        model = meta_model(model_name, model_params, info)
        if model is None:
            return
        try:
            find_last_layer(model, torch.empty((2, *info.input_shape), device="meta"))
        except SpecError:
            raise
        except Exception:  # an op without a meta kernel: `fit` checks on the real model
            return

    def attach(self, model: nn.Module, x: torch.Tensor) -> LaplacePosterior:
        """Fit the posterior of `model` on its training inputs x and keep it (with the forward hook that
        keeps the last layer's features) for `postprocess_logits`."""
        old = self._posteriors.pop(model, None)
        if old is not None and old.handle is not None:
            old.handle.remove()
        post = fit_laplace(model, x, self.params.prior_precision, self.params.hessian)
        ref = weakref.ref(post)

        def keep(mod, args):
            target = ref()
            if target is not None:
                target.features = args[0].detach()

        post.handle = post.layer.register_forward_pre_hook(keep)
        self._posteriors[model] = post
        return post

    def fit(self, job: FitJob) -> nn.Module:
        """Train model m with the recipe, then fit the last-layer posterior on its members; reports
        ``logit_var``, the mean over members and classes of the logits' posterior variance."""
        model = train_plain(self, job)
        post = self.attach(model, job.x)
        phi, _ = features_and_logits(model, post.layer, job.x)
        job.report["logit_var"] = float(post.logit_variance(phi).mean())
        return model

    def posterior(self, model: nn.Module) -> LaplacePosterior:
        try:
            return self._posteriors[model]
        except KeyError:
            raise RuntimeError("llla: no posterior for this model (LastLayerLaplace.fit fits it)") from None

    def postprocess_logits(self, model: nn.Module, logits: torch.Tensor, generator: torch.Generator
                           ) -> torch.Tensor:
        post = self.posterior(model)
        phi, post.features = post.features, None
        if phi is None:
            raise RuntimeError("llla: no features kept for these logits (query the model itself)")
        phi = phi.flatten(1)
        check_features(post, phi, logits)
        return probit_log_probs(logits, post.logit_variance(phi)).to(logits.dtype)

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"prior_precision": Float(1e-2, 1e2, log=True), "hessian": Categorical(("diag", "kfac"))}
