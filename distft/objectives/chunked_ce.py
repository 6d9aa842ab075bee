"""The LM head and cross-entropy in chunks of target rows: peak memory O(chunk x vocab).

The idea of Liger's fused linear cross-entropy and Apple's Cut Cross-Entropy, in plain
torch so it runs on every device. For the n target rows h (n, d) of the hidden states,
the head weight W (V, d), bias b and targets t:

    z_i  = post(h_i W^T + b)            (the logits; `post` is the model's epilogue)
    loss = sum_i [ logsumexp(z_i) - z_i[t_i] ]

The forward takes `chunk` rows at a time and, while a chunk's logits exist, also computes
that chunk's part of the gradients of the loss (as Liger does):

    dL/dz_i = softmax(z_i) - onehot(t_i)
    dL/dx_i = dL/dz_i * post'(x_i)                      (x_i = h_i W^T + b)
    dL/dh_i = dL/dx_i W        dL/dW = sum_i dL/dx_i^T h_i        dL/db = sum_i dL/dx_i

then frees the chunk's logits; the backward multiplies the kept gradients (the size of h,
W, b) by the incoming gradient g. No (n, V) tensor ever exists, and no logit is computed
twice: the head's matmuls are the three of the unchunked forward + backward. Without
grad mode (eval) or with nothing requiring grad, the forward computes the loss alone.

Logits are computed in the weight's dtype (as the head
would) and taken to fp32 for the softmax, as the unchunked path does. The weight and bias
gradients are summed over chunks in fp32 when the weight is fp32 and in the weight's
dtype otherwise (the matmul accumulates in fp32 inside a chunk; a bf16 buffer the size of
W instead of an fp32 one keeps the memory win on GPU). A frozen weight or bias (LoRA) gets
no gradient: `requires_grad` (and grad mode) say which are wanted. Under ZeRO-3 the whole
computation runs inside the head's forward call, where DeepSpeed has gathered the weight;
the backward needs no weight.

The epilogue reproduces what Hugging Face models do to the head's output: a logit scale
(Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`) and final logit
soft-capping (Gemma 2/3: cap * tanh(x / cap)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Epilogue:
    """What the model does to the head's output before the softmax, in this order."""

    multiply: float | None = None  # Cohere: logits * logit_scale
    divide: float | None = None  # Granite: logits / logits_scaling
    softcap: float | None = None  # Gemma 2/3: cap * tanh(logits / cap)

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 logits from the head's output, and tanh(x / cap) (None without a cap)."""
        z = x.float()
        if self.multiply is not None:
            z = z * self.multiply
        if self.divide is not None:
            z = z / self.divide
        if self.softcap is None:
            return z, None
        t = torch.tanh(z / self.softcap)
        return t * self.softcap, t

    def backward(self, dz: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """dL/dx from dL/dz (in place on `dz`)."""
        if t is not None:
            dz.mul_(1 - t * t)  # d/dx cap*tanh(x/cap) = 1 - tanh^2
        if self.divide is not None:
            dz.div_(self.divide)
        if self.multiply is not None:
            dz.mul_(self.multiply)
        return dz


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        epilogue: Epilogue,
        want: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        want_h, want_w, want_b = want
        acc = torch.float32 if weight.dtype == torch.float32 else weight.dtype
        dh = torch.empty_like(hidden) if want_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        db = None
        if want_b and bias is not None:
            db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.size(0), chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            z, th = epilogue.apply(F.linear(h, weight, bias))
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
            if dh is None and dw is None and db is None:
                continue  # no gradient wanted (eval): the loss alone
            dz = z.sub_(lse[:, None]).exp_()  # softmax, in place
            dz[torch.arange(dz.size(0), device=dz.device), t] -= 1
            dx = epilogue.backward(dz, th).to(weight.dtype)
            del z, th, dz
            if dh is not None:
                dh[s : s + chunk] = dx @ weight
            if dw is not None:
                dw.addmm_(dx.t().to(acc), h.to(acc))
            if db is not None:
                db += dx.float().sum(0)
        ctx.grads = (dh, dw, db)  # of the loss; the backward scales them by its gradient
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dw, db = ctx.grads
        ctx.grads = None
        out = [None if d is None else d.mul_(grad.to(d.dtype)) for d in (dh, dw, db)]
        return out[0], out[1], out[2], None, None, None, None


def chunked_nll_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    epilogue: Epilogue = Epilogue(),
) -> torch.Tensor:
    """sum_i -log softmax(post(hidden_i W^T + b))[targets_i], `chunk` rows at a time (a
    scalar in fp32). `hidden` (n, d), `weight` (V, d), `bias` (V,) or None, `targets` (n,)
    of class ids (no ignore index: the caller passes the target rows alone)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    grad_on = torch.is_grad_enabled()
    want = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    out: torch.Tensor = _ChunkedNLL.apply(hidden, weight, bias, targets, chunk, epilogue, want)
    return out
