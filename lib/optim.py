"""
The optimizer of amlm's train.py: AdamW (the default), or LAMB as in the paper's code, with weight decay on the
weight matrices only. Part of a PyTorch reimplementation of Edman & Fraser, "Mask and You Shall Receive: Optimizing
Masked Language Modeling for Pretraining BabyLMs" (BabyLM 2025).

    opt = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01)   # train.py sets each step's lr itself
"""
import torch


def make_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.01):
    """AdamW or LAMB, betas (0.9, 0.98), eps 1e-6, weight decay on matrices only (not on norms or biases).
    Example: make_optimizer(model, "lamb", lr=7e-3, weight_decay=0.1) -> the paper's optimizer, our decay rule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)  # fused: one kernel, not one per tensor


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): Adam's step with decoupled weight
    decay, u = m_hat / (sqrt(v_hat) + eps) + wd * w, rescaled per tensor by the trust ratio ||w|| / ||u||, so each
    layer moves by about lr times its own size. Example: w [3, 4], gradient [1, 0], first step, wd 0, lr 0.1:
    m_hat [1, 0], v_hat [1, 0], u [1, 0], trust 5 / 1 -> w [3 - 0.1 * 5, 4] = [2.5, 4]."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g, state = w.grad.to_dense(), self.state[w]
                if not state:
                    state.update(step=0, m=torch.zeros_like(w), v=torch.zeros_like(w))
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.lerp_(g, 1 - b1)                    # m = b1 m + (1 - b1) g
                v.mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
                u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * w
                w_norm, u_norm = w.norm(), u.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                w.sub_(lr * trust * u)
