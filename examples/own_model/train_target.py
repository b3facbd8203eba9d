"""Train "your" model the way you would, outside raymia: a plain PyTorch loop on half of the digits
training split. It saves what an audit needs: the weights (target.pt, a state_dict) and the indices of
the training points it saw (members.npy, indices into raymia's digits training split)."""

import numpy as np
import torch
import torch.nn.functional as F

from net import build
from raymia.data import load_dataset

EPOCHS, LR, BATCH = 40, 2e-3, 64  # audit.yaml's train: block repeats this recipe for the shadows

data = load_dataset("digits")
rng = np.random.default_rng(1)
members = np.sort(rng.permutation(data.x_train.shape[0])[: data.x_train.shape[0] // 2])
x, y = data.x_train[members], data.y_train[members]

torch.manual_seed(1)
model = build(type("P", (), {"width": 256})(), data.info)
opt = torch.optim.Adam(model.parameters(), lr=LR)
for _ in range(EPOCHS):
    for batch in torch.randperm(len(x)).split(BATCH):
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()

model.eval()
with torch.no_grad():
    test_acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
torch.save(model.state_dict(), "target.pt")
np.save("members.npy", members)
print(f"target trained on {len(members)} points, test accuracy {test_acc:.3f}: target.pt, members.npy")
