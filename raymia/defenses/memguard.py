"""MemGuard (Jia, Salem, Backes, Zhang & Gong, CCS 2019): adversarial noise on released confidence vectors.

The defender trains its own membership classifier g (the "defense model") on its model's confidence
vectors, then, for every query, finds noise that turns the released vector into an adversarial example
for g (g's output moved to 0.5) without changing the predicted label, and releases it at random so that the
expected L1 distortion stays within a budget epsilon. Ported from the official code
(github.com/jinyuan-jia/MemGuard: ``train_defense_model_defensemodel.py``, ``defense_framework.py``, the
phase-II rule of ``evaluate_nn_attack.py``, the networks of ``model/fccnet_location.py``):

- g: an MLP C -> 256 -> 128 -> 64 -> 1 (ReLU, sigmoid output, Glorot-uniform weights) on the confidence
  vector sorted in ascending order, trained with binary cross-entropy on model m's outputs (eval mode) for
  its members (label 1) and for reference non-members (label 0). The non-members are PUBLIC points
  (`FitJob.reference_x`: training points outside the audited population), never audited points; g is fitted
  per bank model, seeded from the model's defense seed, so every shadow repeats exactly the target's
  procedure.
- Phase I (per query, vectorised over the queried points): starting from the sorted logits z0, normalised
  gradient steps z <- z - step * grad / ||grad||_2 on
  c1 |g_logit(softmax(z))| + c2 ReLU(max_{j != top} z_j - z_top) + c3 ||softmax(z) - softmax(z0)||_1
  until the predicted label is kept and g's output has crossed 0.5 (at most `max_iter` - 1 steps); on
  success the search restarts from z0 with c3 x 10 (c3 = 0.1, 1, ..., 1e5), keeping the last success (the
  least distortion that still crosses 0.5). A point whose first search fails gets no noise. c1 = 1,
  c2 = 10 and step 0.1 are the official values.
- Phase II: with r the noise found and d = ||softmax(z*) - softmax(z0)||_1, the noised vector is released
  with probability min(epsilon / d, 1) (0 when g's output on it is not closer to 0.5 than on the original),
  else the original: the expected L1 distortion of every query is at most epsilon (the paper's budget is an
  expectation; a single released vector may move by more than epsilon). The draw uses the query generator
  (seeded per model).

Defaults are the official ones (g: plain SGD, lr 0.001, 400 epochs, batches of 64, at most 1000 members
and 1000 non-members). Differences from the official code: PyTorch instead of Keras (same layers and
initialisation scheme; g's loss weights the two classes equally when their counts differ); the non-members
are public points rather than a held-out slice of the target's own data set (the only ones an audit may
fit on); the official evaluation reports the phase-II release only in expectation (expected inference
accuracy), here each release is drawn; the released logits are z* (their softmax is the released vector)
or the original logits. On scikit-learn's digits the official SGD leaves g weak (balanced accuracy near
0.57) and its output close to 0.5: ``defense_optimizer: adam`` with ``defense_epochs: 20`` trains a
sharper g (docs/validity.md).
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymia.datainfo import DataInfo
from raymia.defenses.base import DEFENSES, Defense, FitJob, outputs, require_public, train_plain
from raymia.errors import SpecError
from raymia.registry import MAX_EPOCHS, MAX_STEPS, Params
from raymia.seeding import derive_seed
from raymia.space import Domain, Float
from raymia.spec import TrainSpec
from raymia.train.loop import member_batches, module_net, run_steps

C1, C2, C3_START, C3_ROUNDS = 1.0, 10.0, 0.1, 7  # the official constants (c3 = 0.1 ... 1e5)
NEAR_HALF = 1e-5  # an output this close to 0.5 already needs no noise (official)


class MemGuardParams(Params):
    """MemGuard's budget, the defender's classifier g and the phase-I search (defaults: the official
    code's)."""

    epsilon: float = Field(0.5, ge=0.0, le=2.0, description="budget of the expected L1 distortion of each "
                           "released probability vector (2 is the largest possible L1 distance)")
    defense_epochs: int = Field(400, ge=1, le=MAX_EPOCHS, description="epochs of the defender's membership classifier g "
                                "over its members and reference points (official: 400)")
    defense_optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer of g (official: plain "
                                                      "SGD)")
    defense_lr: float = Field(1e-3, gt=0.0, le=1.0, description="learning rate of g (official: 0.001)")
    defense_batch_size: int = Field(64, ge=1, validation_alias="defense_batch",
                                    description="batch size of g (official: 64)")
    defense_points: int | None = Field(1000, ge=1, description="at most this many members, and as many "
                                       "public reference points, fit g (drawn from the model's seed; "
                                       "official: 1000 each); null: all")
    max_iter: int = Field(300, ge=2, le=MAX_STEPS, description="phase I: iteration limit of each search (official: 300)")
    step: float = Field(0.1, gt=0.0, description="phase I: length of each normalised gradient step on the "
                        "logits (official: 0.1)")


class DefenseModel(nn.Module):
    """The defender's membership classifier g on a confidence vector sorted in ascending order (official
    `model_defense`): returns g's logit (sigmoid(logit) = membership probability)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)  # Keras' glorot_uniform
                nn.init.zeros_(layer.bias)

    def forward(self, probs_sorted: torch.Tensor) -> torch.Tensor:
        return self.net(probs_sorted).squeeze(1)

    def of_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """g's logit on the softmax of `logits`, sorted."""
        return self(logits.softmax(dim=1).sort(dim=1).values)


def _subset(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """At most k rows of x, drawn without replacement from `seed` (in their original order)."""
    if x.shape[0] <= k:
        return x
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return x[pick.to(x.device)]


def fit_defense_model(member_logits: torch.Tensor, ref_logits: torch.Tensor, num_classes: int, seed: int,
                      epochs: int, lr: float, batch: int,
                      optimizer: str = "sgd") -> tuple[DefenseModel, float]:
    """Train g on sorted softmax vectors: members 1, reference points 0 (binary cross-entropy, each class
    weighted by half over its count). Returns g (eval mode, frozen) and its balanced training accuracy."""
    device = member_logits.device
    feats = torch.cat([member_logits, ref_logits]).softmax(dim=1).sort(dim=1).values
    labels = torch.cat([torch.ones(member_logits.shape[0]), torch.zeros(ref_logits.shape[0])]).to(device)
    n_m, n_r = member_logits.shape[0], ref_logits.shape[0]
    weights = torch.where(labels > 0, feats.new_tensor(0.5 * (n_m + n_r) / n_m),
                          feats.new_tensor(0.5 * (n_m + n_r) / n_r))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "memguard", "init"))
        g = DefenseModel(num_classes).to(device)
    n = feats.shape[0]
    batch = min(batch, n)
    # plain SGD (no momentum) or Adam at a constant lr, on the step loop
    recipe = TrainSpec(optimizer=optimizer, lr=lr, momentum=0.0, epochs=epochs, batch_size=batch)
    per_epoch = -(-n // batch)
    target = torch.stack([labels, weights], dim=1)  # each row's label and its class weight travel together
    batches = member_batches(feats, target, recipe,
                             torch.Generator().manual_seed(derive_seed(seed, "memguard", "order")), torch.Generator())
    g.train()
    run_steps(module_net(g), batches,
              lambda out, t, step: F.binary_cross_entropy_with_logits(out, t[:, 0], weight=t[:, 1]),
              recipe, epochs * per_epoch, per_epoch, names=["memguard's defender classifier"],
              remedy="lower defense_lr")
    g.eval().requires_grad_(False)
    with torch.no_grad():
        hit = (g(feats) > 0) == (labels > 0)
        acc = 0.5 * (float(hit[:n_m].float().mean()) + float(hit[n_m:].float().mean()))
    return g, acc


def phase_one(g: DefenseModel, logits: torch.Tensor, max_iter: int = 300,
              step: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """MemGuard's phase I for every row of `logits` [N, C] at once. Returns the noised logits z* [N, C] (in
    the original class order; equal to `logits` where no noise was found) and a bool [N]: noise found."""
    n, c = logits.shape
    z0_all = logits.detach().float()
    order = z0_all.argsort(dim=1, stable=True)  # ascending: the predicted class is last
    zs0 = z0_all.gather(1, order)
    p0 = zs0.softmax(dim=1)
    with torch.no_grad():
        s0 = torch.sigmoid(g(p0))
    result = zs0.clone()
    found = torch.zeros(n, dtype=torch.bool, device=logits.device)
    alive = (s0 - 0.5).abs() > NEAR_HALF  # near 0.5 already: released as it is (official)
    side0 = s0 - 0.5
    for k in range(C3_ROUNDS):
        rows = alive.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        c3 = C3_START * 10.0 ** k
        z, pref, side = zs0[rows].clone(), p0[rows], side0[rows]
        done = torch.zeros(rows.numel(), dtype=torch.bool, device=logits.device)
        for _ in range(1, max_iter):
            act = (~done).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            za = z[act].requires_grad_(True)
            pa = za.softmax(dim=1)
            wrong = za[:, : c - 1].max(dim=1).values
            loss = (C1 * g(pa).abs() + C2 * F.relu(wrong - za[:, c - 1])
                    + c3 * (pa - pref[act]).abs().sum(dim=1)).sum()
            (grad,) = torch.autograd.grad(loss, za)
            norm = grad.norm(dim=1, keepdim=True)
            za = za.detach() - step * grad / torch.where(norm > 0, norm, torch.ones_like(norm))
            z[act] = za
            with torch.no_grad():
                score = torch.sigmoid(g(za.softmax(dim=1)))
                keeps = za.argmax(dim=1) == c - 1
                crossed = (score - 0.5) * side[act] <= 0
            done[act] = keeps & crossed
        # success: record and try again with a 10x larger distortion weight; failure: keep the last success
        result[rows[done]] = z[done]
        found[rows[done]] = True
        alive[rows[~done]] = False
    out = torch.empty_like(result).scatter_(1, order, result)
    return out.to(logits.dtype), found


def phase_two(g: DefenseModel, logits: torch.Tensor, noised: torch.Tensor, epsilon: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MemGuard's phase II: release `noised` with probability min(epsilon / d, 1), d the L1 distance of the
    two probability vectors (0 when the noise does not bring g's output closer to 0.5). Returns the released
    logits and the release probabilities (float64 [N])."""
    with torch.no_grad():
        p, q = logits.double().softmax(dim=1), noised.double().softmax(dim=1)
        d = (q - p).abs().sum(dim=1)
        dist_noised = (torch.sigmoid(g.of_logits(noised.float())) - 0.5).abs()
        closer = dist_noised < (torch.sigmoid(g.of_logits(logits.float())) - 0.5).abs()
        prob = torch.where(closer & (d > 0), (epsilon / d.clamp_min(1e-300)).clamp(max=1.0),
                           torch.zeros_like(d))
        u = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64).to(logits.device)
        release = (u < prob) & (noised.argmax(dim=1) == logits.argmax(dim=1))
        return torch.where(release[:, None], noised, logits), prob


@DEFENSES.register(
    "memguard",
    MemGuardParams,
    doc="MemGuard (CCS 2019): label-preserving adversarial noise against the defender's own membership "
        "classifier, released within an expected L1 budget.",
)
class MemGuard(Defense):
    """MemGuard as the paper and official code define it (see the module docstring).

    The classifier itself trains with the spec's recipe and plain cross-entropy (the step loop, in `fit`);
    `fit` then fits the defender's membership classifier g for that model, kept beside the model (a weak
    reference: the model is not modified) for `postprocess_logits`. Models train one at a time.
    """

    params: MemGuardParams

    def __init__(self, params: MemGuardParams, info: DataInfo, label_smoothing: float = 0.0):
        super().__init__(params, info, label_smoothing)
        self._defense_models: weakref.WeakKeyDictionary[nn.Module, DefenseModel] = weakref.WeakKeyDictionary()

    def check_data(self, data: Any, population: Any) -> None:
        """g's non-members are public points: refuse a plan that leaves none."""
        require_public(self.name, data, population, "as the non-members of the defender's membership "
                       "classifier")

    def fit(self, job: FitJob) -> nn.Module:
        """Train model m with the recipe (the step loop: the defense's loss, cross-entropy with the recipe's label smoothing),
        then fit g on its outputs for its members and the public reference points. Reports g's balanced
        training accuracy as ``defense_model_accuracy``."""
        if job.reference_x is None or job.reference_x.shape[0] == 0:
            raise SpecError("memguard needs public reference points (training points outside the audited "
                            "population) for its membership classifier", where="plan.population")
        model = train_plain(self, job)
        p = self.params
        xm, xr = job.x, job.reference_x
        if p.defense_points is not None:
            xm = _subset(xm, p.defense_points, derive_seed(job.seed, "memguard", "members"))
            xr = _subset(xr, p.defense_points, derive_seed(job.seed, "memguard", "reference"))
        g, acc = fit_defense_model(outputs(model, xm), outputs(model, xr), self.info.num_classes, job.seed,
                                   p.defense_epochs, p.defense_lr, p.defense_batch_size, p.defense_optimizer)
        self._defense_models[model] = g
        job.report["defense_model_accuracy"] = acc
        return model

    def defense_model(self, model: nn.Module) -> DefenseModel:
        """The membership classifier `fit` trained for `model`."""
        try:
            return self._defense_models[model]
        except KeyError:
            raise RuntimeError("memguard: no defense model for this classifier (MemGuard.fit trains "
                               "it)") from None

    def postprocess_logits(
        self, model: torch.nn.Module, logits: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        if logits.shape[0] == 0 or logits.shape[1] < 2 or self.params.epsilon == 0:
            return logits
        g = self.defense_model(model)
        with torch.enable_grad():
            noised, _ = phase_one(g, logits, self.params.max_iter, self.params.step)
        released, _ = phase_two(g, logits, noised, self.params.epsilon, generator)
        return released

    @property
    def modifies_outputs(self) -> bool:
        return self.params.epsilon > 0

    def inert(self, recipe: Any) -> str | None:
        return "epsilon 0 allows no distortion: the outputs are released unchanged" if self.params.epsilon == 0 \
            else None

    @classmethod
    def search_space(cls) -> dict[str, Domain]:
        return {"epsilon": Float(0.0, 1.0)}
