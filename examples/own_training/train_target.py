"""Train the target with your own recipe (recipe.train) on half of the digits training split; save its
weights and member indices for the audit, whose shadows raymia trains with the same function."""

import numpy as np
import torch

from raymia.data import load_dataset
from raymia.models import build_model
from recipe import train

data = load_dataset("digits")
rng = np.random.default_rng(2)
members = np.sort(rng.permutation(data.x_train.shape[0])[: data.x_train.shape[0] // 2])

torch.manual_seed(2)
model = build_model("mlp", {"hidden": [256]}, data.info)  # a registered model: audit.yaml's model block
train(model, data.x_train[members], data.y_train[members], epochs=30, lr=0.05, batch_size=64, mixup=0.2, seed=2)
with torch.no_grad():
    test_acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
torch.save(model.state_dict(), "target.pt")
np.save("members.npy", members)
print(f"target trained with mixup on {len(members)} points, test accuracy {test_acc:.3f}: target.pt, members.npy")
