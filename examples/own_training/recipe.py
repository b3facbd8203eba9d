"""The user's own training recipe: SGD with a cosine schedule and mixup, which raymia's loop lacks.

`train` is what you already have. `fit` adapts it to raymia (`train.function: recipe:fit`): raymia calls
`fit(job, params)` once per shadow model with a freshly built `job.model`, its members `job.x`, `job.y` on
`job.device`, the spec's `train:` block as `job.recipe` and `job.seed`; `params` holds
`train.function.params`. It returns the trained model.
"""

import torch
import torch.nn.functional as F


def train(model, x, y, *, epochs: int, lr: float, batch_size: int, mixup: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    beta = torch.distributions.Beta(mixup, mixup) if mixup > 0 else None
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(batch_size):
            xb, yb = x[batch], y[batch]
            if beta is not None:  # mixup: convex pairs of inputs, the loss mixed as their labels are
                lam = beta.sample().item()
                perm = torch.randperm(len(xb), generator=gen)
                out = model(lam * xb + (1 - lam) * xb[perm])
                loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb[perm])
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fit(job, params):
    r = job.recipe
    return train(job.model, job.x, job.y, epochs=r.epochs, lr=r.lr, batch_size=r.batch_size,
                 mixup=getattr(params, "mixup", 0.0), seed=job.seed)
