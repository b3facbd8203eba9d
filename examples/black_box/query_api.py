"""A black-box audit's input: the outputs of a model you can only query (an API).

Here the "API" is a model trained on a third of the digits training split; all the audit gets is what it
answers: rounded probabilities for 600 training points (some it trained on, some not) and for the test
split, written to outputs.npz, with the indices of its training points in members.txt."""

import numpy as np
import torch
import torch.nn.functional as F

from raymia.data import load_dataset
from raymia.models import build_model

data = load_dataset("digits")
n = data.x_train.shape[0]
rng = np.random.default_rng(3)
members = np.sort(rng.permutation(n)[: n // 3])

torch.manual_seed(3)
model = build_model("mlp", {"hidden": [128]}, data.info)
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
x, y = data.x_train[members], data.y_train[members]
for _ in range(60):
    for batch in torch.randperm(len(x)).split(32):
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
model.eval()


def api(inputs: torch.Tensor) -> np.ndarray:
    """What the service returns: probabilities rounded to 4 decimals."""
    with torch.no_grad():
        probs = model(inputs).softmax(1).numpy().astype(np.float64)
    probs = np.round(probs, 4)
    return probs / probs.sum(1, keepdims=True)


asked = np.sort(rng.permutation(n)[:600])  # the points we query: about a third of them members
np.savez("outputs.npz", indices=asked, probs=api(data.x_train[asked]), test_probs=api(data.x_test))
np.savetxt("members.txt", members, fmt="%d")
print(f"queried {len(asked)} training points ({np.isin(asked, members).sum()} members) and the test split: "
      "outputs.npz, members.txt")
