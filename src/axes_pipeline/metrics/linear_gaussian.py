"""A synthetic linear-Gaussian layer trained by gradient descent (METHODS §5, last paragraph).

Why the two axes separate with training, in the smallest model where everything is exact:

* inputs ``x ~ N(0, Sigma_X)`` in ``d`` dimensions: one high-variance direction ``e_top``
  (variance ``top_variance``), one low-variance *task* direction ``e_task``
  (``task_variance``), the rest small (``rest_variance``), randomly rotated;
* task ``T = top_weight * e_top'x + task_weight * e_task'x + noise``: most of T's variance lives
  in the low-variance direction, but per unit of filter weight the high-variance direction
  carries more task covariance;
* a layer of C linear channels ``y = W'x`` and a linear readout ``T_hat = a'y``, trained by
  full-batch gradient descent on the population MSE ``E[(T - a'W'x)^2]`` (closed-form
  moments, no sampling noise, deterministic).

At random initialisation a channel's variance and its task correlation are both driven by its
random weight on ``e_top``, so I_X and I_T are strongly coupled (Spearman ~0.8-0.9). Training
routes the task through ``e_task``: the channels that the readout uses acquire large weights
there, which raises their I_T a lot and their variance little, so the rank coupling falls
(to ~0.05-0.3 over seeds 0-4). Every evaluation step also reports the gradient cosines of
:func:`~axes_pipeline.metrics.gradients.gradient_cosines` with the exact Sigma_X: the whitened
one stays at 0 (the built-in check), the Euclidean one does not.
"""

from __future__ import annotations

import torch

from axes_pipeline.metrics.axes import input_capture
from axes_pipeline.metrics.gaussian import mi_from_rho, small_ops, standardise
from axes_pipeline.metrics.gradients import gradient_cosines
from axes_pipeline.stats import spearman


def linear_gaussian_study(*, input_dim: int = 128, channels: int = 64, top_variance: float = 4.0,
                          task_variance: float = 0.01, rest_variance: float = 0.02, top_weight: float = 0.5,
                          task_weight: float = 30.0, noise_var: float = 1.0, steps: int = 2000, lr: float = 0.005,
                          eval_every: int = 100, seed: int = 0) -> dict[str, list]:
    """Train the synthetic layer and track how the two axes relate.

    Returns a dict of equal-length lists (one entry per evaluated step, step 0 = init):
    ``step``; ``loss`` (population MSE); ``loss_ratio`` (MSE / Var T); ``rho_axes`` (Spearman
    across channels of I_X and I_T, computed with the pipeline's own ``input_capture`` and
    ``task_info``); ``cos_euclid`` and ``cos_whitened`` (mean over channels of |cos(Sigma_X w,
    g_T)| in each metric); ``cos_whitened_max`` (max |.|, ~1e-12: the check).

    Float64 on CPU, seeded, deterministic; ~0.5 s with the defaults. The matrices are tiny, so
    it runs single-threaded (intra-op threads only add synchronisation cost here; the previous
    thread count is restored).
    """
    with small_ops(torch.device("cpu")):
        return _study(input_dim, channels, top_variance, task_variance, rest_variance, top_weight,
                      task_weight, noise_var, steps, lr, eval_every, seed)


def _study(d, c_out, top_variance, task_variance, rest_variance, top_weight, task_weight, noise_var,
           steps, lr, eval_every, seed) -> dict[str, list]:
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=dt))
    lam = torch.full((d,), rest_variance, dtype=dt)
    lam[0], lam[1] = top_variance, task_variance
    sigma_x = (basis * lam) @ basis.T
    sigma_x = 0.5 * (sigma_x + sigma_x.T)
    beta = top_weight * basis[:, 0] + task_weight * basis[:, 1]
    c = sigma_x @ beta  # Cov(x, T)
    var_t = float(beta @ c) + noise_var
    w = torch.randn(d, c_out, generator=gen, dtype=dt) / d**0.5  # W: [d, C], column = filter
    a = torch.randn(c_out, generator=gen, dtype=dt) / c_out**0.5
    solve_chol = torch.linalg.cholesky(sigma_x)

    table: dict[str, list] = {k: [] for k in ("step", "loss", "loss_ratio", "rho_axes", "cos_euclid",
                                              "cos_whitened", "cos_whitened_max")}
    for step in range(steps + 1):
        sw = sigma_x @ w  # [d, C] = Sigma_X w_i per column
        wc = w.T @ c  # [C] = b_i = Cov(y_i, T)
        ww = w.T @ sw  # [C, C] = Cov(y)
        wa = w @ a
        loss = var_t - 2.0 * float(a @ wc) + float(a @ ww @ a)
        if step % eval_every == 0 or step == steps:
            cov = torch.empty(c_out + 1, c_out + 1, dtype=dt)
            cov[0, 0] = var_t
            cov[0, 1:] = wc
            cov[1:, 0] = wc
            cov[1:, 1:] = 0.5 * (ww + ww.T)
            std = standardise(cov)
            i_x = input_capture(std, "median")
            i_t = mi_from_rho(std.rho_t)
            cos = gradient_cosines(sw.T, c, w.T, lambda v: torch.cholesky_solve(v, solve_chol))
            table["step"].append(step)
            table["loss"].append(loss)
            table["loss_ratio"].append(loss / var_t)
            table["rho_axes"].append(spearman(i_x.cpu().numpy(), i_t.cpu().numpy())[0])
            table["cos_euclid"].append(float(cos["cos_euclid"].abs().mean()))
            table["cos_whitened"].append(float(cos["cos_whitened"].abs().mean()))
            table["cos_whitened_max"].append(float(cos["cos_whitened"].abs().max()))
        if step == steps:
            break
        # population MSE gradients: dL/dW = 2 (Sigma_X W a - c) a',  dL/da = 2 (W' Sigma_X W a - W' c)
        resid = sigma_x @ wa - c
        grad_w = 2.0 * torch.outer(resid, a)
        grad_a = 2.0 * (ww @ a - wc)
        w = w - lr * grad_w
        a = a - lr * grad_a
    return table
